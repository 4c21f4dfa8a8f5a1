//! Syntax check for the cron schedules of scheduled-task components (five fields, or an `@daily`-style macro).

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
    use super::check;

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
