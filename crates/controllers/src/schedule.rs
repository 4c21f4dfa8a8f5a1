//! Scheduled tasks: a binding of a `scheduled-task` release runs nothing continuously; at each time its cron
//! schedule names (in its time zone) the binding controller starts a run on the data plane
//! ([`dataplane::DataPlane::start_run`]), following the release's concurrency policy when a run is still going,
//! and keeps the last runs (exit and logs).
//!
//! The binding's status holds the schedule's state: `lastScheduleTime` (the last due time handled; a server that
//! was down through due times runs once for the latest of them, not once per missed time), `nextScheduleTime`,
//! `nextRun` (the number the next run gets) and `runs` (number, state, exit code, message, last lines; newest
//! first). Setting the annotation `kiln.dev/run-requested` to a new value asks for a run now (`kiln task run`).

use dataplane::{DataPlane, RunState, RunStatus, Workload, WorkloadId};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use model::cron::Schedule;
use model::kinds::{ConcurrencyPolicy, ReleaseSnapshot, DEFAULT_RUN_HISTORY};
use model::{ConditionStatus, Resource};
use runtime::conditions::{new_condition, set_condition};
use serde_json::{json, Value};
use std::time::Duration;
use store::{Key, Store};

use crate::status::{record_event, EventType};

/// The annotation whose new value asks for a run now.
pub const RUN_REQUESTED: &str = "kiln.dev/run-requested";
/// Re-check interval while a run is going (the driver's change notifications usually come first).
const RUNNING_RECHECK: Duration = Duration::from_secs(2);
/// Most due times a lookup walks past (minutes, hours or days) before giving up.
const MAX_STEPS: usize = 200_000;

/// The schedule of a release, ready to evaluate.
pub struct Plan {
    schedule: Schedule,
    tz: TimeZone,
    tz_name: String,
    policy: ConcurrencyPolicy,
    keep: usize,
}

impl Plan {
    /// Reads the snapshot's schedule, time zone and policy; the error names the field.
    pub fn of(snap: &ReleaseSnapshot) -> Result<Plan, String> {
        let expr = snap
            .schedule
            .as_deref()
            .ok_or("spec.schedule: a scheduled task needs a schedule")?;
        let mut plan = Plan::cron(expr, snap.timezone.as_deref(), "spec")?;
        plan.policy = snap.concurrency_policy.unwrap_or_default();
        plan.keep = snap.run_history_limit.unwrap_or(DEFAULT_RUN_HISTORY) as usize;
        Ok(plan)
    }

    /// The IANA name of the schedule's time zone.
    pub fn tz_name(&self) -> &str {
        &self.tz_name
    }

    /// A plain cron schedule in a time zone (UTC when none); errors name `<at>.schedule` or `<at>.timezone`.
    pub fn cron(expr: &str, timezone: Option<&str>, at: &str) -> Result<Plan, String> {
        let schedule = Schedule::parse(expr).map_err(|e| format!("{at}.schedule: {e}"))?;
        let tz_name = timezone.unwrap_or("UTC").to_string();
        let tz = TimeZone::get(&tz_name)
            .map_err(|e| format!("{at}.timezone: unknown time zone {tz_name:?}: {e}"))?;
        Ok(Plan {
            schedule,
            tz,
            tz_name,
            policy: ConcurrencyPolicy::default(),
            keep: DEFAULT_RUN_HISTORY as usize,
        })
    }

    /// The first due time strictly after `after`. Civil times a DST gap skips run at the shifted instant; a
    /// civil time a DST fold repeats runs once.
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        let s = &self.schedule;
        let start = after.to_zoned(self.tz.clone()).datetime();
        let mut dt = start
            .with()
            .second(0)
            .subsec_nanosecond(0)
            .build()
            .ok()?
            .checked_add(1.minute())
            .ok()?;
        for _ in 0..MAX_STEPS {
            let weekday = dt.weekday().to_sunday_zero_offset() as u32;
            if !s.day_matches(dt.month() as u32, dt.day() as u32, weekday) {
                dt = dt.date().tomorrow().ok()?.at(0, 0, 0, 0);
                continue;
            }
            if !s.hour_matches(dt.hour() as u32) {
                dt = dt
                    .with()
                    .minute(0)
                    .build()
                    .ok()?
                    .checked_add(1.hour())
                    .ok()?;
                continue;
            }
            if !s.minute_matches(dt.minute() as u32) {
                dt = dt.checked_add(1.minute()).ok()?;
                continue;
            }
            let at = self.tz.to_zoned(dt).ok()?.timestamp();
            if at > after {
                return Some(at);
            }
            dt = dt.checked_add(1.minute()).ok()?;
        }
        None
    }

    /// The latest due time in `(after, now]`, if any.
    fn latest_due(&self, after: Timestamp, now: Timestamp) -> Option<Timestamp> {
        let mut due = None;
        let mut t = after;
        for _ in 0..10_000 {
            match self.next_after(t) {
                Some(n) if n <= now => {
                    due = Some(n);
                    t = n;
                }
                _ => break,
            }
        }
        due
    }
}

fn ts(status: &Value, field: &str) -> Option<Timestamp> {
    status.get(field)?.as_str()?.parse().ok()
}

fn run_json(r: &RunStatus) -> Value {
    json!({
        "run": r.run,
        "state": match r.state {
            RunState::Running => "Running",
            RunState::Succeeded => "Succeeded",
            RunState::Failed => "Failed",
        },
        "exitCode": r.exit_code,
        "message": r.message,
        "lastLogs": r.last_logs,
    })
}

/// What one pass over a scheduled task decided: the status to write and when to look again.
pub struct Outcome {
    pub requeue: Duration,
}

/// One pass over a scheduled-task binding: starts what is due, records runs, prunes old ones. `status` is
/// updated in place; the caller writes it.
#[allow(clippy::too_many_arguments)]
pub async fn reconcile(
    store: &Store,
    key: &Key,
    obj: &Resource,
    status: &mut Value,
    snap: &ReleaseSnapshot,
    workload: &Workload,
    driver: &dyn DataPlane,
    generation: Option<u64>,
) -> Outcome {
    let ready = |status: &mut Value, s, reason: &str, message: String| {
        set_condition(
            status,
            new_condition("Ready", s, reason, message, generation),
        );
    };
    let plan = match Plan::of(snap) {
        Ok(p) => p,
        Err(e) => {
            ready(status, ConditionStatus::False, "InvalidSchedule", e);
            return Outcome {
                requeue: Duration::from_secs(60),
            };
        }
    };
    let id: &WorkloadId = &workload.id;
    let now = Timestamp::now();
    let mut runs = match driver.runs(id).await {
        Ok(r) => r,
        Err(e) => {
            ready(
                status,
                ConditionStatus::False,
                "StatusUnavailable",
                format!("{} data plane: {e}", driver.name()),
            );
            return Outcome {
                requeue: Duration::from_secs(5),
            };
        }
    };
    let map = status.as_object_mut().expect("status is an object");
    // A binding that ran replicas before (the component changed type) has none now.
    map.remove("endpoints");
    map.remove("readyReplicas");
    // A new binding starts counting from now: no run for times before it existed.
    let last = ts(status, "lastScheduleTime").unwrap_or(now);
    let requested = obj.metadata.annotations.get(RUN_REQUESTED).cloned();
    let handled = status
        .get("runRequested")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let manual = requested.is_some() && requested != handled;
    let due = plan.latest_due(last, now);
    let mut next_run = status.get("nextRun").and_then(Value::as_u64).unwrap_or(1);
    let mut problem = None;
    if due.is_some() || manual {
        let why = if manual { "asked for" } else { "scheduled" };
        let active: Vec<u64> = runs
            .iter()
            .filter(|r| r.state == RunState::Running)
            .map(|r| r.run)
            .collect();
        let start = match (plan.policy, active.is_empty()) {
            (_, true) | (ConcurrencyPolicy::Allow, false) => true,
            (ConcurrencyPolicy::Forbid, false) => {
                record_event(
                    store,
                    key,
                    EventType::Warning,
                    "RunSkipped",
                    format!(
                        "a {why} run was skipped: run {} is still going (concurrency policy Forbid)",
                        active[0]
                    ),
                )
                .await;
                false
            }
            (ConcurrencyPolicy::Replace, false) => {
                for r in &active {
                    if let Err(e) = driver.stop_run(id, *r).await {
                        tracing::warn!(workload = %id, run = r, error = %e, "stopping a run failed");
                    }
                    record_event(
                        store,
                        key,
                        EventType::Normal,
                        "RunReplaced",
                        format!("run {r} was stopped for a {why} run (concurrency policy Replace)"),
                    )
                    .await;
                }
                true
            }
        };
        if start {
            match driver.start_run(workload, next_run).await {
                Ok(()) => {
                    record_event(
                        store,
                        key,
                        EventType::Normal,
                        "RunStarted",
                        format!(
                            "run {next_run} of release {} started ({why})",
                            workload.release
                        ),
                    )
                    .await;
                    next_run += 1;
                }
                Err(e) => problem = Some(format!("{} data plane: {e}", driver.name())),
            }
        }
        if problem.is_none() {
            let map = status.as_object_mut().expect("status is an object");
            if let Some(d) = due {
                map.insert("lastScheduleTime".into(), json!(d.to_string()));
            }
            if let Some(r) = &requested {
                map.insert("runRequested".into(), json!(r));
            }
            map.insert("nextRun".into(), json!(next_run));
        }
        runs = driver.runs(id).await.unwrap_or(runs);
    }
    if ts(status, "lastScheduleTime").is_none() {
        let map = status.as_object_mut().expect("status is an object");
        map.insert("lastScheduleTime".into(), json!(last.to_string()));
        map.insert("nextRun".into(), json!(next_run));
    }
    // Events for runs that ended since the last pass.
    let before: Vec<(u64, String)> = status
        .get("runs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| {
            Some((
                r.get("run")?.as_u64()?,
                r.get("state")?.as_str()?.to_owned(),
            ))
        })
        .collect();
    for r in &runs {
        let was_running = before.iter().any(|(n, s)| *n == r.run && s == "Running");
        let known = before.iter().any(|(n, _)| *n == r.run);
        if r.state != RunState::Running && (was_running || !known) {
            let (type_, reason) = match r.state {
                RunState::Succeeded => (EventType::Normal, "RunSucceeded"),
                _ => (EventType::Warning, "RunFailed"),
            };
            record_event(
                store,
                key,
                type_,
                reason,
                format!("run {}: {}", r.run, r.message),
            )
            .await;
        }
    }
    // Keep the newest finished runs; running ones always stay.
    let finished: Vec<u64> = runs
        .iter()
        .filter(|r| r.state != RunState::Running)
        .map(|r| r.run)
        .collect();
    let excess = finished.len().saturating_sub(plan.keep);
    for n in &finished[..excess] {
        if let Err(e) = driver.remove_run(id, *n).await {
            tracing::warn!(workload = %id, run = n, error = %e, "removing an old run failed");
        }
    }
    runs.retain(|r| !finished[..excess].contains(&r.run));
    let running = runs.iter().any(|r| r.state == RunState::Running);
    let next = plan.next_after(ts(status, "lastScheduleTime").unwrap_or(now).max(now));
    let map = status.as_object_mut().expect("status is an object");
    map.insert(
        "runs".into(),
        Value::Array(runs.iter().rev().map(run_json).collect()),
    );
    match next {
        Some(n) => map.insert("nextScheduleTime".into(), json!(n.to_string())),
        None => map.remove("nextScheduleTime"),
    };
    let last_run = runs.last().map(|r| {
        format!(
            "; run {} {}",
            r.run,
            match r.state {
                RunState::Running => "is running".to_string(),
                RunState::Succeeded => "succeeded".to_string(),
                RunState::Failed => format!("failed: {}", r.message),
            }
        )
    });
    match problem {
        Some(p) => ready(status, ConditionStatus::False, "RunFailedToStart", p),
        None => ready(
            status,
            ConditionStatus::True,
            "Scheduled",
            format!(
                "{} ({}); next run {}{}",
                snap.schedule.as_deref().unwrap_or(""),
                plan.tz_name,
                next.map_or("never".to_string(), |n| n.to_string()),
                last_run.unwrap_or_default()
            ),
        ),
    }
    let until_next = next
        .and_then(|n| n.duration_since(Timestamp::now()).try_into().ok())
        .unwrap_or(Duration::from_secs(60))
        .max(Duration::from_millis(50))
        // A little past the minute, so the due time has passed when the pass runs.
        + Duration::from_millis(20);
    Outcome {
        requeue: if running {
            until_next.min(RUNNING_RECHECK)
        } else {
            until_next
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(expr: &str, tz: &str) -> Plan {
        let snap: ReleaseSnapshot = serde_json::from_value(json!({
            "type": "scheduled-task", "replicas": 1, "schedule": expr, "timezone": tz
        }))
        .unwrap();
        Plan::of(&snap).unwrap()
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn next_due_times_in_a_time_zone() {
        let p = plan("30 9 * * MON-FRI", "Europe/Paris");
        // Saturday 2026-11-21 12:00 UTC → Monday 09:30 Paris (UTC+1) = 08:30 UTC.
        assert_eq!(
            p.next_after(at("2026-11-21T12:00:00Z")),
            Some(at("2026-11-23T08:30:00Z"))
        );
        let p = plan("*/15 * * * *", "UTC");
        assert_eq!(
            p.next_after(at("2026-11-21T12:00:00Z")),
            Some(at("2026-11-21T12:15:00Z"))
        );
        assert_eq!(
            p.next_after(at("2026-11-21T12:14:59Z")),
            Some(at("2026-11-21T12:15:00Z"))
        );
        let p = plan("0 0 29 2 *", "UTC");
        assert_eq!(
            p.next_after(at("2026-03-01T00:00:00Z")),
            Some(at("2028-02-29T00:00:00Z"))
        );
    }

    #[test]
    fn daylight_saving_gaps_and_folds() {
        // 2026-03-29 02:30 does not exist in Paris (02:00 → 03:00): the run happens at the shifted instant.
        let p = plan("30 2 * * *", "Europe/Paris");
        assert_eq!(
            p.next_after(at("2026-03-28T12:00:00Z")),
            Some(at("2026-03-29T01:30:00Z"))
        );
        // 2026-10-25 02:30 happens twice in Paris: one run, at the first.
        let first = p.next_after(at("2026-10-24T12:00:00Z")).unwrap();
        assert_eq!(first, at("2026-10-25T00:30:00Z"));
        assert_eq!(p.next_after(first), Some(at("2026-10-26T01:30:00Z")));
    }

    #[test]
    fn missed_times_run_once() {
        let p = plan("0 * * * *", "UTC");
        assert_eq!(
            p.latest_due(at("2026-11-21T08:00:00Z"), at("2026-11-21T12:30:00Z")),
            Some(at("2026-11-21T12:00:00Z"))
        );
        assert_eq!(
            p.latest_due(at("2026-11-21T12:00:00Z"), at("2026-11-21T12:30:00Z")),
            None
        );
    }

    #[test]
    fn unknown_zones_and_bad_schedules_name_the_field() {
        let snap: ReleaseSnapshot = serde_json::from_value(json!({
            "type": "scheduled-task", "replicas": 1, "schedule": "0 3 * * *", "timezone": "Mars/Olympus"
        }))
        .unwrap();
        assert!(Plan::of(&snap)
            .err()
            .unwrap()
            .starts_with("spec.timezone: unknown time zone"));
    }
}
