//! The API's route table. Every API route is registered through [`Api::op`], which adds it to the router AND
//! records its documentation, so the OpenAPI document is generated from the same table that builds the router.

use axum::handler::Handler;
use axum::http::Method;
use axum::routing::{on, MethodFilter};
use axum::Router;
use serde_json::{json, Map, Value};

use crate::AppState;

/// One documented operation.
#[derive(Debug, Clone)]
pub struct Op {
    pub method: Method,
    /// Axum path syntax, which is also OpenAPI's: `/api/v1/orgs/{org}`.
    pub path: String,
    pub id: String,
    pub summary: String,
    pub tag: &'static str,
    /// Served without authentication.
    pub public: bool,
    /// Query parameters: (name, description).
    pub query: Vec<(&'static str, &'static str)>,
    /// `$ref` name of the request body schema in `components/schemas`, if the operation takes a body.
    pub request: Option<&'static str>,
    /// Success status and the `$ref` name of its body schema (`None` for no JSON body).
    pub response: (u16, Option<&'static str>),
    /// Content type of the success body when it is not JSON.
    pub response_type: Option<&'static str>,
}

impl Op {
    pub fn new(
        method: Method,
        path: impl Into<String>,
        id: impl Into<String>,
        tag: &'static str,
        summary: impl Into<String>,
    ) -> Self {
        Op {
            method,
            path: path.into(),
            id: id.into(),
            summary: summary.into(),
            tag,
            public: false,
            query: Vec::new(),
            request: None,
            response: (200, None),
            response_type: None,
        }
    }
    pub fn public(mut self) -> Self {
        self.public = true;
        self
    }
    pub fn query(mut self, name: &'static str, description: &'static str) -> Self {
        self.query.push((name, description));
        self
    }
    pub fn body(mut self, schema: &'static str) -> Self {
        self.request = Some(schema);
        self
    }
    pub fn returns(mut self, status: u16, schema: Option<&'static str>) -> Self {
        self.response = (status, schema);
        self
    }
    pub fn returns_type(mut self, status: u16, content_type: &'static str) -> Self {
        self.response = (status, None);
        self.response_type = Some(content_type);
        self
    }
}

fn filter(m: &Method) -> MethodFilter {
    match *m {
        Method::GET => MethodFilter::GET,
        Method::POST => MethodFilter::POST,
        Method::PUT => MethodFilter::PUT,
        Method::PATCH => MethodFilter::PATCH,
        Method::DELETE => MethodFilter::DELETE,
        _ => MethodFilter::OPTIONS,
    }
}

/// Builds the router and the documentation together.
pub struct Api {
    pub router: Router<AppState>,
    pub ops: Vec<Op>,
}

impl Api {
    pub fn new() -> Self {
        Api {
            router: Router::new(),
            ops: Vec::new(),
        }
    }

    /// Registers `handler` for `op.method` at `op.path`, and documents it.
    pub fn op<H, T>(mut self, op: Op, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.router = self.router.route(&op.path, on(filter(&op.method), handler));
        self.ops.push(op);
        self
    }
}

impl Default for Api {
    fn default() -> Self {
        Self::new()
    }
}

fn path_params(path: &str) -> Vec<String> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}').map(str::to_string))
        .collect()
}

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// The OpenAPI 3.0 document for the given operations.
pub fn openapi(ops: &[Op], version: &str) -> Value {
    let mut paths = Map::new();
    for op in ops {
        let mut params: Vec<Value> = path_params(&op.path)
            .into_iter()
            .map(|p| json!({"name": p, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        params.extend(op.query.iter().map(|(n, d)| json!({"name": n, "in": "query", "required": false, "description": d, "schema": {"type": "string"}})));
        let success = match (op.response.1, op.response_type) {
            (Some(s), _) => {
                json!({"description": "success", "content": {"application/json": {"schema": schema_ref(s)}}})
            }
            (None, Some(t)) => {
                json!({"description": "success", "content": {t: {"schema": {"type": "string"}}}})
            }
            (None, None) => json!({"description": "success"}),
        };
        let mut responses = Map::new();
        responses.insert(op.response.0.to_string(), success);
        let problem = json!({"description": "a problem (RFC 9457)", "content": {"application/problem+json": {"schema": schema_ref("Problem")}}});
        responses.insert("default".into(), problem);
        let mut o = json!({
            "operationId": op.id,
            "summary": op.summary,
            "tags": [op.tag],
            "parameters": params,
            "responses": responses,
        });
        if op.public {
            o["security"] = json!([]);
        }
        if let Some(body) = op.request {
            let media = if body == "MergePatch" {
                "application/merge-patch+json"
            } else {
                "application/json"
            };
            let mut content = Map::new();
            content.insert(media.into(), json!({"schema": schema_ref(body)}));
            if media == "application/json" {
                content.insert(
                    "application/yaml".into(),
                    json!({"schema": schema_ref(body)}),
                );
            }
            o["requestBody"] = json!({"required": true, "content": content});
        }
        let entry = paths.entry(op.path.clone()).or_insert_with(|| json!({}));
        entry[op.method.as_str().to_ascii_lowercase()] = o;
    }
    json!({
        "openapi": "3.0.3",
        "info": {"title": "Kiln API", "version": version, "description": "Kiln's REST API. Errors are RFC 9457 problem documents."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"session": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "an API token (`kiln token create`)"},
                "session": {"type": "apiKey", "in": "cookie", "name": crate::auth::SESSION_COOKIE},
            },
            "schemas": crate::schemas::all(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_from_path() {
        assert_eq!(
            path_params("/api/v1/orgs/{org}/projects/{project}/components/{name}"),
            ["org", "project", "name"]
        );
        assert!(path_params("/healthz").is_empty());
    }
}
