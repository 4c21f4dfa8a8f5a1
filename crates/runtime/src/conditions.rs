//! Writing `status.conditions[]` and `status.observedGeneration` the Kubernetes way: one entry per type,
//! `lastTransitionTime` moving only when the status flips.

use model::{Condition, ConditionStatus};
use serde_json::{json, Map, Value};

/// A condition of `type_` with the given status, reason and message, computed from `generation` of the object.
/// `lastTransitionTime` is left empty for [`set_condition`] to fill in.
pub fn new_condition(
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: impl Into<String>,
    generation: Option<u64>,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: String::new(),
    }
}

/// Inserts or replaces the condition of `condition.type_` in `status.conditions`. When a condition of that type
/// already had the same status its `lastTransitionTime` is kept; otherwise the given one is used, or now if it
/// is empty. When the condition carries an `observedGeneration`, `status.observedGeneration` is set to it too.
/// A `status` that is not an object, or `conditions` that are not an array, are replaced rather than trusted.
/// Returns whether `status` changed.
pub fn set_condition(status: &mut Value, mut condition: Condition) -> bool {
    let before = status.clone();
    let map = object(status);
    let list = array(map.entry("conditions").or_insert(Value::Null));
    let existing = list
        .iter()
        .position(|c| c.get("type").and_then(Value::as_str) == Some(&condition.type_));
    if let Some(old) =
        existing.and_then(|i| serde_json::from_value::<Condition>(list[i].clone()).ok())
    {
        if old.status == condition.status && !old.last_transition_time.is_empty() {
            condition.last_transition_time = old.last_transition_time;
        }
    }
    if condition.last_transition_time.is_empty() {
        condition.last_transition_time = jiff::Timestamp::now().to_string();
    }
    let generation = condition.observed_generation;
    let value = condition_json(condition);
    match existing {
        Some(i) => list[i] = value,
        None => list.push(value),
    }
    if let Some(generation) = generation {
        map.insert("observedGeneration".into(), generation.into());
    }
    before != *status
}

/// Sets `status.observedGeneration` (removes it for `None`). Returns whether `status` changed.
pub fn set_observed_generation(status: &mut Value, generation: Option<u64>) -> bool {
    let before = status.clone();
    let map = object(status);
    match generation {
        Some(g) => map.insert("observedGeneration".into(), g.into()),
        None => map.remove("observedGeneration"),
    };
    before != *status
}

/// The status of the condition `type_` in `status`, if it is set and well-formed.
pub fn condition_status(status: &Value, type_: &str) -> Option<ConditionStatus> {
    status
        .get("conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(type_))
        .and_then(|c| serde_json::from_value::<Condition>(c.clone()).ok())
        .map(|c| c.status)
}

/// `value` as a JSON object, replacing anything else (null, a string…) with an empty one.
fn object(value: &mut Value) -> &mut Map<String, Value> {
    if !value.is_object() {
        *value = Value::Object(Map::new());
    }
    match value {
        Value::Object(map) => map,
        _ => unreachable!("replaced by an object just above"),
    }
}

/// `value` as a JSON array, replacing anything else with an empty one.
fn array(value: &mut Value) -> &mut Vec<Value> {
    if !value.is_array() {
        *value = Value::Array(Vec::new());
    }
    match value {
        Value::Array(list) => list,
        _ => unreachable!("replaced by an array just above"),
    }
}

fn condition_json(c: Condition) -> Value {
    let status = match c.status {
        ConditionStatus::True => "True",
        ConditionStatus::False => "False",
        ConditionStatus::Unknown => "Unknown",
    };
    let mut v = json!({
        "type": c.type_,
        "status": status,
        "reason": c.reason,
        "message": c.message,
        "lastTransitionTime": c.last_transition_time,
    });
    if let (Some(g), Some(map)) = (c.observed_generation, v.as_object_mut()) {
        map.insert("observedGeneration".into(), g.into());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(c: Condition, time: &str) -> Condition {
        Condition {
            last_transition_time: time.into(),
            ..c
        }
    }

    #[test]
    fn adds_a_condition_and_the_observed_generation() {
        let mut status = Value::Null;
        let c = new_condition(
            "Ready",
            ConditionStatus::False,
            "Waiting",
            "not yet",
            Some(3),
        );
        assert!(set_condition(&mut status, at(c, "2024-01-01T00:00:00Z")));
        assert_eq!(
            status,
            json!({
                "observedGeneration": 3,
                "conditions": [{
                    "type": "Ready", "status": "False", "reason": "Waiting", "message": "not yet",
                    "observedGeneration": 3, "lastTransitionTime": "2024-01-01T00:00:00Z",
                }],
            })
        );
    }

    #[test]
    fn keeps_the_transition_time_while_the_status_holds() {
        let mut status = json!({});
        let c = new_condition("Ready", ConditionStatus::False, "Waiting", "a", Some(1));
        set_condition(&mut status, at(c, "2024-01-01T00:00:00Z"));
        let c = new_condition(
            "Ready",
            ConditionStatus::False,
            "StillWaiting",
            "b",
            Some(2),
        );
        assert!(set_condition(&mut status, at(c, "2024-02-02T00:00:00Z")));
        assert_eq!(
            status["conditions"][0]["lastTransitionTime"],
            "2024-01-01T00:00:00Z"
        );
        assert_eq!(status["conditions"][0]["reason"], "StillWaiting");
        assert_eq!(status["observedGeneration"], 2);

        let c = new_condition("Ready", ConditionStatus::True, "Ready", "", Some(2));
        assert!(set_condition(&mut status, at(c, "2024-03-03T00:00:00Z")));
        assert_eq!(
            status["conditions"][0]["lastTransitionTime"],
            "2024-03-03T00:00:00Z"
        );
        assert_eq!(status["conditions"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn setting_the_same_condition_again_changes_nothing() {
        let mut status = json!({});
        let c = new_condition("Ready", ConditionStatus::True, "Ready", "", Some(1));
        assert!(set_condition(&mut status, c.clone()));
        assert!(
            !set_condition(&mut status, c),
            "a fresh timestamp must not count as a change"
        );
    }

    #[test]
    fn an_empty_transition_time_becomes_now() {
        let mut status = json!({});
        set_condition(
            &mut status,
            new_condition("Ready", ConditionStatus::True, "Ready", "", None),
        );
        let time = status["conditions"][0]["lastTransitionTime"]
            .as_str()
            .unwrap_or_default();
        assert!(time.parse::<jiff::Timestamp>().is_ok(), "{time:?}");
        assert!(status.get("observedGeneration").is_none());
    }

    #[test]
    fn other_types_and_foreign_fields_are_left_alone_and_garbage_is_replaced() {
        let mut status =
            json!({"phase": "x", "conditions": [{"type": "Other", "status": "True"}, 7]});
        set_condition(
            &mut status,
            new_condition("Ready", ConditionStatus::True, "Ready", "", None),
        );
        assert_eq!(status["phase"], "x");
        assert_eq!(
            status["conditions"][0],
            json!({"type": "Other", "status": "True"})
        );
        assert_eq!(status["conditions"][2]["type"], "Ready");
        assert_eq!(
            condition_status(&status, "Ready"),
            Some(ConditionStatus::True)
        );

        let mut status = json!({"conditions": "nonsense"});
        set_condition(
            &mut status,
            new_condition("Ready", ConditionStatus::False, "R", "", None),
        );
        assert_eq!(
            condition_status(&status, "Ready"),
            Some(ConditionStatus::False)
        );
        let mut status = json!("nonsense");
        assert!(set_observed_generation(&mut status, Some(4)));
        assert_eq!(status, json!({"observedGeneration": 4}));
    }
}
