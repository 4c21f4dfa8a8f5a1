//! The cron schedules of scheduled-task components (five fields, or an `@daily`-style macro): a syntax check
//! that says which field is wrong, and [`Schedule`], which says whether a civil date and time matches. Finding
//! the next run in a time zone is the caller's (the model does no time-zone I/O).

const MACROS: &[&str] = &[
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@midnight",
    "@hourly",
];
const MONTHS: &[&str] = &[
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const DAYS: &[&str] = &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const FIELDS: [Field; 5] = [
    Field {
        name: "minute",
        min: 0,
        max: 59,
        names: &[],
    },
    Field {
        name: "hour",
        min: 0,
        max: 23,
        names: &[],
    },
    Field {
        name: "day of month",
        min: 1,
        max: 31,
        names: &[],
    },
    Field {
        name: "month",
        min: 1,
        max: 12,
        names: MONTHS,
    },
    Field {
        name: "day of week",
        min: 0,
        max: 7,
        names: DAYS,
    },
];

/// Checks a standard five-field cron expression (`minute hour day-of-month month day-of-week`, each field `*`,
/// a number, a range `a-b`, a list `a,b`, with an optional `/step`; month and weekday names allowed) or a macro
/// such as `@daily`. The error says which field is wrong and why.
pub fn check(expr: &str) -> Result<(), String> {
    let expr = expr.trim();
    if expr.starts_with('@') {
        return if MACROS.contains(&expr) {
            Ok(())
        } else {
            Err(format!(
                "unknown macro {expr:?} (use one of {})",
                MACROS.join(", ")
            ))
        };
    }
    let parts: Vec<&str> = expr.split_whitespace().collect();
    if parts.len() != FIELDS.len() {
        return Err(format!(
            "expected 5 fields (minute hour day-of-month month day-of-week), got {}",
            parts.len()
        ));
    }
    for (part, field) in parts.iter().zip(FIELDS.iter()) {
        for item in part.split(',') {
            check_item(item, field)
                .map_err(|why| format!("{} field {part:?}: {why}", field.name))?;
        }
    }
    Ok(())
}

/// A parsed schedule: for each field, the set of values that match (bit `v` set for value `v`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    /// Sunday is 0 (7 is folded onto it).
    weekdays: u8,
    /// Whether day-of-month and day-of-week were both restricted (then either may match, as in Vixie cron).
    either_day: bool,
}

impl Schedule {
    /// Parses what [`check`] accepts.
    pub fn parse(expr: &str) -> Result<Schedule, String> {
        check(expr)?;
        let expr = match expr.trim() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            e => e,
        };
        let parts: Vec<&str> = expr.split_whitespace().collect();
        let mut sets = [0u64; 5];
        for (i, (part, field)) in parts.iter().zip(FIELDS.iter()).enumerate() {
            for item in part.split(',') {
                sets[i] |= item_bits(item, field)?;
            }
        }
        // Weekday 7 is Sunday.
        if sets[4] & (1 << 7) != 0 {
            sets[4] = (sets[4] & !(1 << 7)) | 1;
        }
        let restricted = |p: &str| !p.starts_with('*');
        Ok(Schedule {
            minutes: sets[0],
            hours: sets[1] as u32,
            days: sets[2] as u32,
            months: sets[3] as u16,
            weekdays: sets[4] as u8,
            either_day: restricted(parts[2]) && restricted(parts[4]),
        })
    }

    /// Whether the day (month 1-12, day 1-31, weekday 0-6 from Sunday) is one the schedule runs on.
    pub fn day_matches(&self, month: u32, day: u32, weekday: u32) -> bool {
        if self.months & (1 << month) == 0 {
            return false;
        }
        let dom = self.days & (1 << day) != 0;
        let dow = self.weekdays & (1 << (weekday % 7)) != 0;
        if self.either_day {
            dom || dow
        } else {
            dom && dow
        }
    }

    /// Whether the hour (0-23) is one the schedule runs in.
    pub fn hour_matches(&self, hour: u32) -> bool {
        self.hours & (1 << hour) != 0
    }

    /// Whether the minute (0-59) is one the schedule runs at.
    pub fn minute_matches(&self, minute: u32) -> bool {
        self.minutes & (1 << minute) != 0
    }
}

/// The values one comma-separated item of a field stands for, as bits.
fn item_bits(item: &str, field: &Field) -> Result<u64, String> {
    check_item(item, field)?;
    let (range, step) = match item.split_once('/') {
        Some((r, s)) => (r, s.parse::<u32>().map_err(|e| e.to_string())?),
        None => (item, 1),
    };
    let (lo, hi) = if range == "*" {
        (field.min, field.max)
    } else {
        match range.split_once('-') {
            Some((a, b)) => (value(a, field)?, value(b, field)?),
            // `5/15`: from 5 to the end, every 15.
            None if item.contains('/') => (value(range, field)?, field.max),
            None => {
                let v = value(range, field)?;
                (v, v)
            }
        }
    };
    let mut bits = 0u64;
    let mut v = lo;
    while v <= hi {
        bits |= 1 << v;
        v += step;
    }
    Ok(bits)
}

fn check_item(item: &str, field: &Field) -> Result<(), String> {
    let (range, step) = match item.split_once('/') {
        Some((r, s)) => (r, Some(s)),
        None => (item, None),
    };
    if let Some(step) = step {
        match step.parse::<u32>() {
            Ok(s) if s >= 1 && s <= field.max.max(1) => {}
            _ => {
                return Err(format!(
                    "step {step:?} must be a number from 1 to {}",
                    field.max.max(1)
                ))
            }
        }
    }
    if range == "*" {
        return Ok(());
    }
    let (lo, hi) = match range.split_once('-') {
        Some((a, b)) => (value(a, field)?, Some(value(b, field)?)),
        None => (value(range, field)?, None),
    };
    if let Some(hi) = hi {
        if lo > hi {
            return Err(format!("range {range:?} is backwards"));
        }
    }
    Ok(())
}

fn value(s: &str, field: &Field) -> Result<u32, String> {
    let upper = s.to_ascii_uppercase();
    if let Some(i) = field.names.iter().position(|n| *n == upper) {
        // Month names count from 1, weekday names from 0 (Sunday).
        return Ok(i as u32 + field.min);
    }
    match s.parse::<u32>() {
        Ok(v) if (field.min..=field.max).contains(&v) => Ok(v),
        Ok(v) => Err(format!("{v} is out of range {}-{}", field.min, field.max)),
        Err(_) => Err(format!("{s:?} is not a number")),
    }
}

#[cfg(test)]
mod tests {
    use super::{check, Schedule};

    #[test]
    fn schedules_match() {
        let s = Schedule::parse("*/15 9-17 * * MON-FRI").unwrap();
        assert!(s.minute_matches(0) && s.minute_matches(45) && !s.minute_matches(10));
        assert!(s.hour_matches(9) && s.hour_matches(17) && !s.hour_matches(18));
        // 2026-11-20 is a Friday (5), 2026-11-21 a Saturday (6).
        assert!(s.day_matches(11, 20, 5) && !s.day_matches(11, 21, 6));
        // Both day fields restricted: either matches.
        let s = Schedule::parse("0 0 1 * SUN").unwrap();
        assert!(s.day_matches(3, 1, 3) && s.day_matches(3, 8, 0) && !s.day_matches(3, 9, 1));
        // Only one restricted: that one decides.
        let s = Schedule::parse("0 0 13 * *").unwrap();
        assert!(s.day_matches(2, 13, 4) && !s.day_matches(2, 14, 4));
        let s = Schedule::parse("0 0 * * 7").unwrap();
        assert!(s.day_matches(5, 3, 0) && !s.day_matches(5, 4, 1));
        let s = Schedule::parse("@hourly").unwrap();
        assert!(s.minute_matches(0) && !s.minute_matches(1) && s.hour_matches(13));
        let s = Schedule::parse("5/20 * * JAN,jul *").unwrap();
        assert!(
            s.minute_matches(5)
                && s.minute_matches(25)
                && s.minute_matches(45)
                && !s.minute_matches(0)
        );
        assert!(s.day_matches(1, 9, 2) && s.day_matches(7, 9, 2) && !s.day_matches(2, 9, 2));
    }

    #[test]
    fn accepts() {
        for ok in [
            "* * * * *",
            "0 3 * * *",
            "*/15 9-17 * * MON-FRI",
            "0 0 1,15 JAN,jul 0",
            "@daily",
            "5 4 * * 7",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn rejects_with_reason() {
        let cases = [
            ("61 * * * *", "minute field \"61\": 61 is out of range 0-59"),
            ("* * *", "expected 5 fields (minute hour day-of-month month day-of-week), got 3"),
            ("@often", "unknown macro \"@often\" (use one of @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly)"),
            ("* * * FOO *", "month field \"FOO\": \"FOO\" is not a number"),
            ("*/0 * * * *", "minute field \"*/0\": step \"0\" must be a number from 1 to 59"),
            ("* 5-2 * * *", "hour field \"5-2\": range \"5-2\" is backwards"),
            ("* * 0 * *", "day of month field \"0\": 0 is out of range 1-31"),
        ];
        for (expr, want) in cases {
            assert_eq!(check(expr).err().as_deref(), Some(want), "{expr}");
        }
    }
}
