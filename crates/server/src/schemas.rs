//! JSON schemas of the API's bodies, for the OpenAPI document's `components/schemas`.

use schemars::gen::{SchemaGenerator, SchemaSettings};
use schemars::JsonSchema;
use serde_json::{json, Map, Value};

fn add<T: JsonSchema>(gen: &mut SchemaGenerator, name: &str, out: &mut Map<String, Value>) {
    let schema = gen.subschema_for::<T>();
    let mut v = serde_json::to_value(schema).unwrap_or(Value::Null);
    // `subschema_for` returns a reference for named types; inline the definition under our own name.
    if let Some(r) = v.get("$ref").and_then(Value::as_str) {
        let def = r.rsplit('/').next().unwrap_or_default().to_string();
        if def != name {
            if let Some(d) = gen.definitions().get(&def) {
                v = serde_json::to_value(d).unwrap_or(Value::Null);
            }
        } else {
            return;
        }
    }
    out.insert(name.to_string(), v);
}

/// Every schema the route table refers to.
pub fn all() -> Value {
    let mut gen = SchemaGenerator::new(SchemaSettings::openapi3());
    let mut out = Map::new();
    add::<model::Resource>(&mut gen, "Resource", &mut out);
    add::<crate::error::Problem>(&mut gen, "Problem", &mut out);
    add::<crate::identity_api::LoginRequest>(&mut gen, "LoginRequest", &mut out);
    add::<crate::identity_api::LoginResponse>(&mut gen, "LoginResponse", &mut out);
    add::<crate::identity_api::WhoAmI>(&mut gen, "WhoAmI", &mut out);
    add::<crate::identity_api::VersionInfo>(&mut gen, "VersionInfo", &mut out);
    add::<crate::identity_api::CreateUserRequest>(&mut gen, "CreateUserRequest", &mut out);
    add::<crate::identity_api::UserInfo>(&mut gen, "UserInfo", &mut out);
    add::<crate::identity_api::PasswordRequest>(&mut gen, "PasswordRequest", &mut out);
    add::<crate::identity_api::CreateTokenRequest>(&mut gen, "CreateTokenRequest", &mut out);
    add::<crate::identity_api::TokenInfo>(&mut gen, "TokenInfo", &mut out);
    add::<crate::delivery::PromoteRequest>(&mut gen, "PromoteRequest", &mut out);
    add::<crate::delivery::ApproveRequest>(&mut gen, "ApproveRequest", &mut out);
    add::<crate::delivery::RollbackRequest>(&mut gen, "RollbackRequest", &mut out);
    add::<crate::delivery::DeliveryResult>(&mut gen, "DeliveryResult", &mut out);
    add::<crate::pipelines::StartRunRequest>(&mut gen, "StartRunRequest", &mut out);
    for (name, def) in gen.definitions() {
        out.entry(name.clone())
            .or_insert_with(|| serde_json::to_value(def).unwrap_or(Value::Null));
    }
    out.insert(
        "ResourceList".into(),
        json!({"type": "object", "required": ["items"], "properties": {
            "apiVersion": {"type": "string"}, "kind": {"type": "string"},
            "metadata": {"type": "object", "properties": {"resourceVersion": {"type": "string"}, "continue": {"type": "string"}}},
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/Resource"}}}}),
    );
    out.insert("ItemList".into(), json!({"type": "object", "required": ["items"], "properties": {"items": {"type": "array", "items": {"type": "object"}}}}));
    out.insert(
        "MergePatch".into(),
        json!({"type": "object", "description": "an RFC 7396 JSON merge patch"}),
    );
    out.insert("StatusUpdate".into(), json!({"type": "object", "required": ["status"], "properties": {"status": {"type": "object"}, "metadata": {"type": "object", "properties": {"resourceVersion": {"type": "string"}}}}}));
    Value::Object(out)
}
