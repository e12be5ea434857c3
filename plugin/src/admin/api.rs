//! The admin HTTP API: the `mailbell user ...` operations over HTTP, so the CLI (while the
//! daemon owns the stores) and the MTA's admin tooling can drive per-user settings.
//!
//! Listens on loopback by default (the listener is the daemon's; see the config). Every
//! request needs `Authorization: Bearer <token>`; a missing or wrong token gets 401. With no
//! token configured the API is disabled and every request gets 403.
//!
//! ```text
//! GET    /admin/v1/users?after=<address>&limit=<n>   200 {"users": [User...], "next": <address>|null}
//! GET    /admin/v1/users/{address}                   200 User (by address or alias) | 404
//! PUT    /admin/v1/users/{address}                   201 User (created) | 200 User (replaced)
//!                                                    body: User JSON; "address" may be omitted
//! PATCH  /admin/v1/users/{address}                   200 User | 404; body: UserPatch JSON
//! DELETE /admin/v1/users/{address}                   204 | 404 (primary address only)
//! POST   /admin/v1/users/import?mode=upsert|add[&format=csv|json][&dry_run=true]
//!                                                    200 ImportReport; body: CSV (users.rs docs),
//!                                                    at most 64 MiB; dry_run writes nothing
//! GET    /admin/v1/users/export?format=csv|json      200 every user, no page cap: the import CSV
//!                                                    (text/csv) or a JSON array of User
//! errors: {"error": "<message>"} with 400 (bad input), 401, 403, 404, 405, 409 (alias or
//!         address taken), 413 (body too large), 503 (store error: retry), 500
//! ```
//! `limit` defaults to 100 and is capped at [`MAX_LIST_LIMIT`]; `next` is the `after` for the
//! next page (null on the last one).
//!
//! More routes (queue, log) join by merging before the token layer goes on:
//! `admin::protect(admin::user_routes(users).merge(other_routes), token)`. Handlers elsewhere
//! can reuse [`ApiError`] for the same JSON error shape.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::header::{CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::bearer::authorized;
use crate::users::{
    normalize_address, ExportFormat, ImportMode, ImportOptions, ImportReport, User, UserError,
    UserPatch, UserStore, MAX_LIST_LIMIT,
};

/// Largest CSV or JSON body `POST /admin/v1/users/import` accepts.
pub const MAX_IMPORT_BODY: usize = 64 * 1024 * 1024;
/// Largest JSON body the other routes accept.
pub const MAX_JSON_BODY: usize = 1024 * 1024;
/// Page size of `GET /admin/v1/users` without `limit`.
pub const DEFAULT_LIST_LIMIT: usize = 100;

/// The user routes behind the token check: what the daemon serves.
pub fn router(users: UserStore, token: Arc<str>) -> Router {
    protect(user_routes(users), token)
}

/// The user routes without authentication, for merging with other admin routes before
/// [`protect`].
pub fn user_routes(users: UserStore) -> Router {
    user_routes_with(users, None)
}

/// The ledger an import writes the billing columns to (`staff_no`, `real_name`, `class`,
/// `note`, and `state` for existing accounts) and an export reads them from.
#[derive(Clone)]
pub struct LedgerLink {
    pub ledger: crate::billing::Ledger,
    /// `billing.default_class`, for accounts an import creates.
    pub default_class: String,
}

#[derive(Clone)]
struct UsersState {
    users: UserStore,
    ledger: Option<LedgerLink>,
}

impl axum::extract::FromRef<UsersState> for UserStore {
    fn from_ref(s: &UsersState) -> UserStore {
        s.users.clone()
    }
}

/// [`user_routes`] with the ledger's account fields in imports and exports.
pub fn user_routes_with(users: UserStore, ledger: Option<LedgerLink>) -> Router {
    Router::new()
        .route("/admin/v1/users", get(list_users))
        .route("/admin/v1/users/export", get(export_users))
        .route(
            "/admin/v1/users/import",
            post(import_users).layer(DefaultBodyLimit::max(MAX_IMPORT_BODY)),
        )
        .route(
            "/admin/v1/users/{address}",
            get(get_user)
                .put(put_user)
                .patch(patch_user)
                .delete(delete_user)
                .layer(DefaultBodyLimit::max(MAX_JSON_BODY)),
        )
        .with_state(UsersState { users, ledger })
}

/// Puts the token check in front of `routes` (and of the JSON 404/405 fallbacks it adds).
/// Call it once, after every admin route has been merged in.
pub fn protect(routes: Router, token: Arc<str>) -> Router {
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(token, require_token))
}

/// Middleware: 403 when no token is configured, 401 without the right bearer token.
pub async fn require_token(State(token): State<Arc<str>>, req: Request, next: Next) -> Response {
    if token.is_empty() {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "admin API disabled: the admin token is not configured",
        )
        .into_response();
    }
    if !authorized(req.headers(), &token) {
        warn!(
            method = %req.method(),
            path = req.uri().path(),
            "admin request without a valid bearer token"
        );
        let mut resp = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token (Authorization: Bearer <token>)",
        )
        .into_response();
        resp.headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return resp;
    }
    next.run(req).await
}

/// An error reply: `{"error": message}` with a status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: &self.message,
            }),
        )
            .into_response()
    }
}

impl From<UserError> for ApiError {
    fn from(e: UserError) -> Self {
        let status = match &e {
            UserError::NotFound { .. } => StatusCode::NOT_FOUND,
            UserError::AliasConflict { .. } | UserError::Exists { .. } => StatusCode::CONFLICT,
            UserError::Store(_) | UserError::Locked { .. } | UserError::Open { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            UserError::Corrupt { .. } | UserError::Encode(_) => StatusCode::INTERNAL_SERVER_ERROR,
            e if e.is_input_error() => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            warn!(error = %e, "admin request failed");
        }
        ApiError::new(status, e.to_string())
    }
}

macro_rules! rejection {
    ($($t:ty),*) => {$(
        impl From<$t> for ApiError {
            fn from(r: $t) -> Self {
                ApiError::new(r.status(), r.body_text())
            }
        }
    )*};
}
rejection!(QueryRejection, PathRejection, BytesRejection);

impl From<JsonRejection> for ApiError {
    /// Bad JSON and JSON of the wrong shape are both 400 (axum says 422 for the latter).
    fn from(r: JsonRejection) -> Self {
        let status = match r.status() {
            StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
            s => s,
        };
        ApiError::new(status, r.body_text())
    }
}

/// Runs a blocking store operation (sled commits and flushes) off the async workers.
async fn blocking<T, F>(f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, UserError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("admin task failed: {e}"),
        )),
    }
}

/// `GET /admin/v1/users` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
}

/// `GET /admin/v1/users` reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserPage {
    pub users: Vec<User>,
    /// Pass as `after` for the next page; `None` on the last page.
    pub next: Option<String>,
}

async fn list_users(
    State(users): State<UserStore>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<UserPage>, ApiError> {
    let Query(q) = query?;
    let limit = q.limit.unwrap_or(DEFAULT_LIST_LIMIT).min(MAX_LIST_LIMIT);
    if limit == 0 {
        return Err(ApiError::bad_request("limit must be at least 1"));
    }
    let page = blocking(move || users.list(q.after.as_deref(), limit)).await?;
    let next = match page.last() {
        Some(last) if page.len() == limit => Some(last.address.clone()),
        _ => None,
    };
    Ok(Json(UserPage { users: page, next }))
}

async fn get_user(
    State(users): State<UserStore>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<User>, ApiError> {
    let Path(address) = path?;
    match users.lookup(&address) {
        Some(u) => Ok(Json((*u).clone())),
        None => Err(UserError::NotFound {
            address: address.to_lowercase(),
        }
        .into()),
    }
}

async fn put_user(
    State(users): State<UserStore>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<User>, JsonRejection>,
) -> Result<(StatusCode, Json<User>), ApiError> {
    let Path(address) = path?;
    let Json(mut user) = body?;
    let address = normalize_address(&address)?;
    if user.address.is_empty() {
        user.address.clone_from(&address);
    } else if normalize_address(&user.address)? != address {
        return Err(ApiError::bad_request(format!(
            "address in the body ({}) differs from the one in the path ({address})",
            user.address
        )));
    }
    let saved = blocking(move || users.save(user)).await?;
    info!(user = %saved.user.address, created = saved.created, "admin: user saved");
    let status = if saved.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(saved.user)))
}

async fn patch_user(
    State(users): State<UserStore>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<UserPatch>, JsonRejection>,
) -> Result<Json<User>, ApiError> {
    let Path(address) = path?;
    let Json(patch) = body?;
    let user = blocking(move || users.update(&address, &patch)).await?;
    info!(user = %user.address, notify = user.notify, "admin: user updated");
    Ok(Json(user))
}

async fn delete_user(
    State(users): State<UserStore>,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let Path(address) = path?;
    let key = address.clone();
    if blocking(move || users.remove(&key)).await? {
        info!(user = %address.to_lowercase(), "admin: user removed");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(UserError::NotFound {
            address: address.to_lowercase(),
        }
        .into())
    }
}

/// `POST /admin/v1/users/import` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportQuery {
    mode: Option<String>,
    /// csv (default) or json (what the export route writes).
    format: Option<String>,
    /// `true`: report what would change, write nothing.
    #[serde(default)]
    dry_run: bool,
}

async fn import_users(
    State(UsersState { users, ledger }): State<UsersState>,
    query: Result<Query<ImportQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ImportReport>, ApiError> {
    let Query(q) = query?;
    let mode: ImportMode = match q.mode.as_deref() {
        None => ImportMode::Upsert,
        Some(m) => m.parse()?,
    };
    let format: ExportFormat = match q.format.as_deref() {
        None => ExportFormat::Csv,
        Some(f) => f.parse()?,
    };
    let body = body?;
    let bytes = body.len();
    let opts = ImportOptions {
        mode,
        dry_run: q.dry_run,
    };
    let (mut report, accounts) =
        blocking(move || users.import_with_accounts(format, &body[..], opts)).await?;
    if let (Some(l), false) = (ledger, q.dry_run || accounts.is_empty()) {
        let class = l.default_class;
        report.ledger_accounts = l
            .ledger
            .call(move |s| crate::users::account_fields::apply(s, &accounts, &class))
            .await
            .map_err(crate::admin::billing::OpError::from)?;
    }
    info!(
        bytes,
        ?mode,
        ?format,
        added = report.added,
        updated = report.updated,
        skipped = report.skipped,
        failed = report.failed,
        unchanged = report.unchanged,
        dry_run = q.dry_run,
        "admin: users imported"
    );
    Ok(Json(report))
}

/// `GET /admin/v1/users/export` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportQuery {
    format: Option<String>,
}

/// The whole registry in one answer, built off the async workers (the registry is loaded in
/// memory already, so the answer is about its size again).
async fn export_users(
    State(UsersState { users, ledger }): State<UsersState>,
    query: Result<Query<ExportQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let format: ExportFormat = match q.format.as_deref() {
        None => ExportFormat::Csv,
        Some(f) => f.parse()?,
    };
    let accounts = match ledger {
        Some(l) => crate::users::account_fields::ledger_accounts(&l.ledger)
            .await
            .map_err(crate::admin::billing::OpError::from)?,
        None => Default::default(),
    };
    let (count, body) = blocking(move || {
        let mut body = Vec::new();
        let count = users.export_with(format, &mut body, &accounts)?;
        Ok((count, body))
    })
    .await?;
    info!(count, ?format, bytes = body.len(), "admin: users exported");
    let content_type = match format {
        ExportFormat::Csv => "text/csv; charset=utf-8",
        ExportFormat::Json => "application/json",
    };
    Ok(([(CONTENT_TYPE, content_type)], body).into_response())
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such admin endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this admin endpoint",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_errors_map_to_statuses() {
        let status = |e: UserError| ApiError::from(e).status;
        assert_eq!(
            status(UserError::NotFound {
                address: "a@b".into()
            }),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            status(UserError::AliasConflict {
                alias: "a@b".into(),
                owner: "c@d".into()
            }),
            StatusCode::CONFLICT
        );
        assert_eq!(
            status(UserError::InvalidPhone { reason: "x" }),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(UserError::CsvHeader("x".into())),
            StatusCode::BAD_REQUEST
        );
    }
}
