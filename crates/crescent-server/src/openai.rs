//! The OpenAI-compatible API: `POST /v1/chat/completions` and `GET /v1/models`.
//!
//! A conversation maps onto one skill request: by default a query whose question is the last
//! user message's text (with the system text prepended to the first user message) about the
//! last user message's image, or the most recent image of the conversation. Detect, point and
//! caption are selected through `vllm_xargs.moondream3_task` (the vLLM convention), with the
//! user text naming the object; their JSON result is the message content.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use crescent_engine::Generation;
use crescent_skills::{CaptionLength, SettingsOverrides, SkillOutput, SkillRequest};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::extract::{Fields, JsonBody};
use crate::run::{self, JobSpec, StreamFormat};
use crate::state::AppState;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `GET /v1/models`.
pub(crate) async fn list_models(State(state): State<AppState>) -> Response {
    Json(json!({
        "object": "list",
        "data": [model_object(&state)],
    }))
    .into_response()
}

/// `GET /v1/models/{id}`.
pub(crate) async fn get_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if id != state.config().model_id {
        return Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "not_found_error",
            "model_not_found",
            format!(
                "model {id:?} does not exist; this server serves {:?}",
                state.config().model_id
            ),
        )
        .with_param("model"));
    }
    Ok(Json(model_object(&state)).into_response())
}

fn model_object(state: &AppState) -> Value {
    json!({
        "id": state.config().model_id,
        "object": "model",
        "created": 0,
        "owned_by": "crescent",
    })
}

/// The text parts and images of one message's content.
#[derive(Default)]
struct Content {
    texts: Vec<String>,
    images: Vec<String>,
}

fn parse_content(v: Option<&Value>, field: &str) -> Result<Content, ApiError> {
    let mut c = Content::default();
    match v {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => c.texts.push(s.clone()),
        Some(Value::Array(parts)) => {
            for (j, part) in parts.iter().enumerate() {
                let pf = format!("{field}[{j}]");
                let Value::Object(map) = part else {
                    return Err(ApiError::invalid_type(&pf, "an object"));
                };
                let p = Fields::new(map, "");
                let kind = p
                    .opt_str("type")?
                    .ok_or_else(|| ApiError::missing_field(&format!("{pf}.type")))?;
                match kind {
                    "text" | "input_text" => {
                        let text = match map.get("text") {
                            Some(Value::String(s)) => s.clone(),
                            None | Some(Value::Null) => {
                                return Err(ApiError::missing_field(&format!("{pf}.text")))
                            }
                            Some(_) => {
                                return Err(ApiError::invalid_type(
                                    &format!("{pf}.text"),
                                    "a string",
                                ))
                            }
                        };
                        c.texts.push(text);
                    }
                    "image_url" | "input_image" => {
                        let url = match map.get("image_url") {
                            Some(Value::String(s)) => s.clone(),
                            Some(Value::Object(o)) => match o.get("url") {
                                Some(Value::String(s)) => s.clone(),
                                None | Some(Value::Null) => {
                                    return Err(ApiError::missing_field(&format!(
                                        "{pf}.image_url.url"
                                    )))
                                }
                                Some(_) => {
                                    return Err(ApiError::invalid_type(
                                        &format!("{pf}.image_url.url"),
                                        "a string",
                                    ))
                                }
                            },
                            None | Some(Value::Null) => {
                                return Err(ApiError::missing_field(&format!("{pf}.image_url")))
                            }
                            Some(_) => {
                                return Err(ApiError::invalid_type(
                                    &format!("{pf}.image_url"),
                                    "an object with a `url` string",
                                ))
                            }
                        };
                        c.images.push(url);
                    }
                    other => {
                        return Err(ApiError::bad_field(
                            &format!("{pf}.type"),
                            "unsupported_content",
                            format!(
                                "unsupported content part type {other:?}; expected \"text\" or \"image_url\""
                            ),
                        ))
                    }
                }
            }
        }
        Some(_) => {
            return Err(ApiError::invalid_type(
                field,
                "a string or an array of content parts",
            ))
        }
    }
    Ok(c)
}

/// The conversation reduced to what the model takes.
struct Conversation {
    /// System text + "\n\n" + text of the first user message when it is the last one;
    /// otherwise the last user message's text.
    question: String,
    /// The last user message's own text (the object of detect / point).
    last_user_text: String,
    /// The last user message's image, or the most recent image of the conversation.
    image: Option<String>,
}

fn parse_messages(f: &Fields<'_>) -> Result<Conversation, ApiError> {
    let messages = f
        .opt_array("messages")?
        .ok_or_else(|| ApiError::missing_field("messages"))?;
    if messages.is_empty() {
        return Err(ApiError::invalid_value(
            "messages",
            "invalid_value",
            "must contain at least one message",
        ));
    }
    let mut system: Vec<String> = Vec::new();
    let mut users: Vec<(String, Vec<String>)> = Vec::new();
    let mut last_image: Option<String> = None;
    for (i, m) in messages.iter().enumerate() {
        let field = format!("messages[{i}]");
        let Value::Object(map) = m else {
            return Err(ApiError::invalid_type(&field, "an object"));
        };
        let mf = Fields::new(map, "");
        let role = mf
            .opt_str("role")?
            .ok_or_else(|| ApiError::missing_field(&format!("{field}.role")))?;
        let content = parse_content(map.get("content"), &format!("{field}.content"))?;
        if let Some(img) = content.images.last() {
            last_image = Some(img.clone());
        }
        match role {
            "system" | "developer" => {
                let t = content.texts.join("\n");
                if !t.is_empty() {
                    system.push(t);
                }
            }
            "user" => users.push((content.texts.join("\n"), content.images)),
            "assistant" | "tool" | "function" => {}
            other => {
                return Err(ApiError::invalid_value(
                    &format!("{field}.role"),
                    "invalid_value",
                    format!("unknown role {other:?}"),
                ))
            }
        }
    }
    let n_users = users.len();
    let Some((last_text, last_images)) = users.last() else {
        return Err(ApiError::invalid_value(
            "messages",
            "invalid_value",
            "the conversation has no user message",
        ));
    };
    let system = system.join("\n\n");
    let question = if n_users == 1 && !system.is_empty() {
        if last_text.is_empty() {
            system
        } else {
            format!("{system}\n\n{last_text}")
        }
    } else {
        last_text.clone()
    };
    Ok(Conversation {
        question,
        last_user_text: last_text.clone(),
        image: last_images.last().cloned().or(last_image),
    })
}

/// Everything of a chat request besides the conversation.
struct ChatOptions {
    stream: bool,
    include_usage: bool,
    model: String,
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat_completions(
    State(state): State<AppState>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let f = Fields::new(&body, "");
    let conv = parse_messages(&f)?;
    let stream = f.opt_bool("stream")?.unwrap_or(false);
    let include_usage = match f.opt_obj("stream_options")? {
        Some(o) => Fields::new(o, "stream_options.")
            .opt_bool("include_usage")?
            .unwrap_or(false),
        None => false,
    };
    if let Some(n) = f.opt_u64("n")? {
        if n != 1 {
            return Err(ApiError::invalid_value(
                "n",
                "invalid_value",
                format!("only n = 1 is supported, got {n}"),
            ));
        }
    }
    let (max_tokens, max_tokens_field) = match f.opt_usize("max_completion_tokens")? {
        Some(v) => (Some(v), "max_completion_tokens"),
        None => (f.opt_usize("max_tokens")?, "max_tokens"),
    };
    let xargs_map = f.opt_obj("vllm_xargs")?;
    let xargs = xargs_map.map(|m| Fields::new(m, "vllm_xargs."));
    let task = match &xargs {
        Some(x) => x.opt_str("moondream3_task")?.unwrap_or("query"),
        None => "query",
    };
    let max_objects = match &xargs {
        Some(x) => x.opt_usize("moondream3_max_objects")?,
        None => None,
    };
    let mut reasoning = f.opt_bool("reasoning")?;
    if let Some(x) = &xargs {
        if let Some(r) = x.opt_bool("moondream3_reasoning")? {
            reasoning = Some(r);
        }
    }
    let overrides = SettingsOverrides {
        temperature: f.opt_f32("temperature")?,
        top_p: f.opt_f32("top_p")?,
        max_tokens,
        max_objects,
        seed: f.opt_u64("seed")?,
    };
    run::validate_overrides(&overrides, "").map_err(|mut e| {
        // Name the field the client actually sent.
        if e.param.as_deref() == Some("max_tokens") && max_tokens_field != "max_tokens" {
            e.message = e
                .message
                .replace("`max_tokens`", &format!("`{max_tokens_field}`"));
            e.param = Some(max_tokens_field.into());
        }
        if e.param.as_deref() == Some("max_objects") {
            e.message = e
                .message
                .replace("`max_objects`", "`vllm_xargs.moondream3_max_objects`");
            e.param = Some("vllm_xargs.moondream3_max_objects".into());
        }
        e
    })?;
    let request = match task {
        "query" => SkillRequest::Query {
            question: conv.question,
            reasoning: reasoning.unwrap_or(false),
            spatial_refs: Vec::new(),
        },
        "caption" => {
            let length = match xargs.as_ref().map(|x| x.opt_str("moondream3_length")) {
                Some(r) => match r? {
                    Some(s) => s.parse::<CaptionLength>().map_err(|e| {
                        ApiError::invalid_value("vllm_xargs.moondream3_length", "invalid_value", e)
                    })?,
                    None => CaptionLength::default(),
                },
                None => CaptionLength::default(),
            };
            SkillRequest::Caption { length }
        }
        "detect" => SkillRequest::Detect {
            object: conv.last_user_text,
            max_objects: None,
        },
        "point" => SkillRequest::Point {
            object: conv.last_user_text,
            max_objects: None,
            spatial_refs: Vec::new(),
        },
        other => {
            return Err(ApiError::invalid_value(
                "vllm_xargs.moondream3_task",
                "invalid_value",
                format!(
                "unknown task {other:?}; expected \"query\", \"caption\", \"detect\" or \"point\""
            ),
            ))
        }
    };
    let opts = ChatOptions {
        stream,
        include_usage,
        model: state.config().model_id.clone(),
    };
    let spec = JobSpec {
        request,
        overrides,
        image_url: conv.image,
        image_field: "image_url",
        settings_prefix: "",
    };
    let mut started = run::start(&state, spec).await?;
    let created = unix_now();
    if opts.stream {
        let fmt = ChatStream {
            id: String::new(),
            created,
            model: opts.model,
            include_usage: opts.include_usage,
        };
        return Ok(run::sse(started, fmt, "").into_response());
    }
    let g = run::collect(&mut started, "").await?;
    let (message, _) = message_of(&g);
    let rid = &started.request_id;
    Ok(Json(json!({
        "id": format!("chatcmpl-{rid}"),
        "object": "chat.completion",
        "created": created,
        "model": opts.model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": g.finish.as_str(),
        }],
        "usage": usage(&g),
        "request_id": rid,
        "metrics": run::metrics_json(&g),
    }))
    .into_response())
}

/// The assistant message of a result, and whether its content is streamed as text deltas.
fn message_of(g: &Generation) -> (Value, bool) {
    match &g.output {
        SkillOutput::Query(q) => {
            let mut m = json!({"role": "assistant", "content": q.answer});
            if let (Some(r), Value::Object(obj)) = (&q.reasoning, &mut m) {
                obj.insert("reasoning".into(), json!(r.text));
                obj.insert(
                    "reasoning_details".into(),
                    json!({ "grounding": r.grounding }),
                );
            }
            (m, true)
        }
        SkillOutput::Caption(c) => (json!({"role": "assistant", "content": c.caption}), true),
        other => (
            json!({"role": "assistant", "content": other.to_json().to_string()}),
            false,
        ),
    }
}

fn usage(g: &Generation) -> Value {
    json!({
        "prompt_tokens": g.input_tokens,
        "completion_tokens": g.output_tokens,
        "total_tokens": g.input_tokens + g.output_tokens,
        "prompt_tokens_details": {"cached_tokens": g.cached_tokens},
    })
}

/// SSE format of chat completions: `chat.completion.chunk` objects, then `[DONE]`.
struct ChatStream {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl ChatStream {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> String {
        let mut v = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "delta": delta,
                "logprobs": null,
                "finish_reason": finish,
            }],
        });
        if self.include_usage {
            if let Value::Object(m) = &mut v {
                m.insert("usage".into(), Value::Null);
            }
        }
        v.to_string()
    }
}

impl StreamFormat for ChatStream {
    fn start(&mut self, request_id: &str) -> Vec<String> {
        self.id = format!("chatcmpl-{request_id}");
        vec![self.chunk(json!({"role": "assistant", "content": ""}), None)]
    }

    fn delta(&mut self, text: &str) -> Vec<String> {
        if text.is_empty() {
            return Vec::new();
        }
        vec![self.chunk(json!({ "content": text }), None)]
    }

    fn done(&mut self, g: &Generation, _request_id: &str) -> Vec<String> {
        let mut out = Vec::new();
        let (message, streamed) = message_of(g);
        if !streamed {
            out.push(self.chunk(json!({"content": message["content"]}), None));
        }
        if let Some(r) = message.get("reasoning") {
            out.push(self.chunk(
                json!({
                    "reasoning": r,
                    "reasoning_details": message["reasoning_details"],
                }),
                None,
            ));
        }
        out.push(self.chunk(json!({}), Some(g.finish.as_str())));
        if self.include_usage {
            out.push(
                json!({
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "choices": [],
                    "usage": usage(g),
                })
                .to_string(),
            );
        }
        out.push("[DONE]".into());
        out
    }

    fn error(&mut self, e: &ApiError, _request_id: &str) -> Vec<String> {
        vec![e.body().to_string(), "[DONE]".into()]
    }
}
