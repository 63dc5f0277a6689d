//! The HTTP API of the bank service.
//!
//! | method and path                 | body                                             |
//! |---------------------------------|--------------------------------------------------|
//! | `POST /accounts`                | `{"account_number", "owner", "initial_deposit"}` |
//! | `POST /accounts/{id}/deposit`   | `{"amount"}`                                     |
//! | `POST /accounts/{id}/withdraw`  | `{"amount"}`                                     |
//! | `POST /accounts/{id}/close`     |                                                  |
//! | `GET /accounts`                 | every balance, from the read model               |
//! | `GET /accounts/{id}`            | one balance, from the read model                 |
//! | `POST /transfers`               | `{"from", "to", "amount"}`: 202 with the transfer |
//! | `GET /transfers/{id}`           | one transfer, loaded from its events             |
//! | `GET /owners/{owner}`           | an owner's total balance and money in flight     |
//! | `GET /healthz`                  | `ok` while the process serves requests (liveness) |
//! | `GET /readyz`                   | 200 or 503 with every check (readiness, see [`crate::readiness`]) |
//! | `GET /metrics`                  | Prometheus text format (see [`crate::prometheus`]) |
//!
//! Amounts are integer cents. Commands answer with the stored events (a transfer, with
//! the transfer: `{"id", "from", "to", "amount", "status", "reason"}`). Errors answer
//! with `{"code", "message"}` and store nothing.
//!
//! ## Transfers
//!
//! `POST /transfers` records the request and answers 202 at once; the transfer process
//! manager then withdraws from `from` and deposits to `to`. `GET /transfers/{id}` shows
//! where it is: `requested`, `withdrawn`, `completed`, `compensated` (the deposit was
//! rejected or timed out, and `from` got the money back; `reason` says why) or `failed`
//! (the withdrawal was rejected, nothing moved). With an `Idempotency-Key` the transfer's
//! id is derived from the key, so a retry finds the same transfer.
//!
//! ## Retrying safely: `Idempotency-Key`
//!
//! Every `POST` accepts an `Idempotency-Key` header (1 to 200 printable ASCII characters
//! without spaces; a UUID v4 per request is the usual choice). The command is executed
//! at most once per key: a retry with the same key (after a timeout, a 5xx or a lost
//! connection) stores nothing and answers with the first execution's status and events,
//! plus the header `Idempotent-Replayed: true`, even if the service restarted in
//! between. One key has one outcome: a command the account rejected (422) is recorded
//! too, and its retry gets the same 422 even if the balance has changed since; a new
//! attempt needs a new key. (A request refused before it reaches the account, 400 or
//! 413, records nothing.) Keys are kept for 7 days. Sending another command (another
//! path, account or body) under a used key answers 422 `IDEMPOTENCY_KEY_REUSED`.
//! Without the header a retry may apply the command twice.
//!
//! | status | code                                                                     |
//! |--------|--------------------------------------------------------------------------|
//! | 400    | `INVALID_BODY`: not JSON, or not the fields above; `INVALID_IDEMPOTENCY_KEY` |
//! | 404    | `NOT_FOUND`                                                              |
//! | 409    | `CONFLICT`: a concurrency conflict that outlasted the retries             |
//! | 413    | `BODY_TOO_LARGE` (over 16 KiB), `EVENT_TOO_LARGE` (over the store's limit) |
//! | 422    | the command's invariant code: `INVALID_ACCOUNT_NUMBER` (1-64 of `A-Z a-z 0-9 - _`), `INVALID_OWNER` (empty, over 200 characters, control characters), `NON_POSITIVE_AMOUNT`, `INSUFFICIENT_FUNDS`, `BALANCE_OVERFLOW`, `ACCOUNT_NOT_OPEN`, `ACCOUNT_CLOSED`, `ACCOUNT_ALREADY_OPENED`, `SAME_ACCOUNT` (a transfer to its own account); `IDEMPOTENCY_KEY_REUSED`; `REJECTED` for a domain error of another type |
//! | 500    | `INTERNAL`                                                               |
//!
//! A `traceparent` header (W3C Trace Context, with `tracestate`) is stored with the
//! command's events, so the consumers that handle them continue the caller's trace.
//!
//! Reads come from the `bank_balances` table, which the Kafka consumer keeps; they are
//! eventually consistent with the commands.

use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use thalo::{CommandId, Error, Event as _, EventEnvelope, Metadata, Repository};
use thalo_postgres::PgEventStore;
use uuid::Uuid;

use crate::balances::AccountBalance;
use crate::owners::{OwnerBalance, PgOwners};
use crate::pg::PgBalances;
use crate::readiness::Readiness;
use crate::transfer::{Transfer, TransferCommand, TransferStatus};
use crate::{BankAccount, BankAccountCommand, BankAccountEvent};

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct AppState {
    /// Commands go through this repository.
    pub repository: Repository<PgEventStore>,
    /// Reads come from this read model.
    pub balances: PgBalances,
    /// `GET /owners/{owner}` reads this view.
    pub owners: PgOwners,
    /// The checks of `GET /readyz`.
    pub readiness: Readiness,
    /// What `GET /metrics` renders; without it, `GET /metrics` is 404.
    pub metrics: Option<PrometheusHandle>,
}

/// The request header that makes a command idempotent.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The response header that marks an answer replayed from an earlier execution.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// The request header that makes a command answer only once the read models show its
/// events (read-your-writes): `Consistency: projected`. Without it a command answers as
/// soon as its events are stored, and a read right after it may not see them yet.
pub const CONSISTENCY: &str = "consistency";

/// The value of [`CONSISTENCY`] that waits for the read models.
pub const CONSISTENCY_PROJECTED: &str = "projected";

/// How long a `Consistency: projected` command waits for the read models before it
/// answers 504 (its events are stored; they show up later).
pub const PROJECTION_WAIT: Duration = Duration::from_secs(10);

/// The largest request body the API reads.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// The API's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/accounts", post(open).get(list))
        .route("/accounts/{id}", get(show))
        .route("/accounts/{id}/deposit", post(deposit))
        .route("/accounts/{id}/withdraw", post(withdraw))
        .route("/accounts/{id}/close", post(close))
        .route("/transfers", post(transfer))
        .route("/transfers/{id}", get(show_transfer))
        .route("/owners/{owner}", get(show_owner))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Body of `POST /accounts`.
#[derive(Debug, Deserialize, Serialize)]
pub struct OpenAccount {
    /// The new account's number.
    pub account_number: String,
    /// The owner's name.
    pub owner: String,
    /// Initial deposit in cents.
    #[serde(default)]
    pub initial_deposit: i64,
}

/// Body of deposits and withdrawals.
#[derive(Debug, Deserialize, Serialize)]
pub struct Amount {
    /// Cents.
    pub amount: i64,
}

/// A stored event, as the API shows it.
#[derive(Debug, Deserialize, Serialize)]
pub struct StoredEvent {
    /// Event id.
    pub id: Uuid,
    /// Position in the account's stream.
    pub sequence: u64,
    /// Event type name.
    pub event_type: String,
    /// The event's fields.
    pub data: serde_json::Value,
}

/// An account's balance, as the API shows it.
#[derive(Debug, Deserialize, Serialize)]
pub struct BalanceView {
    /// The account number.
    pub account_number: String,
    /// The owner.
    pub owner: String,
    /// Cents.
    pub balance: i64,
    /// Whether the account is closed.
    pub closed: bool,
    /// The last event applied to this row.
    pub version: u64,
}

impl From<AccountBalance> for BalanceView {
    fn from(b: AccountBalance) -> Self {
        BalanceView {
            account_number: b.account_number,
            owner: b.owner,
            balance: b.balance,
            closed: b.closed,
            version: b.version,
        }
    }
}

/// Body of `POST /transfers`.
#[derive(Debug, Deserialize, Serialize)]
pub struct TransferRequest {
    /// From this account.
    pub from: String,
    /// To this account.
    pub to: String,
    /// Cents.
    pub amount: i64,
}

/// A transfer, as the API shows it.
#[derive(Debug, Deserialize, Serialize)]
pub struct TransferView {
    /// The transfer's id.
    pub id: String,
    /// From this account.
    pub from: String,
    /// To this account.
    pub to: String,
    /// Cents.
    pub amount: i64,
    /// `requested`, `withdrawn`, `completed`, `compensated` or `failed`.
    pub status: TransferStatus,
    /// Why it was compensated or failed.
    pub reason: Option<String>,
}

impl From<&Transfer> for TransferView {
    fn from(t: &Transfer) -> Self {
        TransferView {
            id: t.id().to_owned(),
            from: t.from().to_owned(),
            to: t.to().to_owned(),
            amount: t.amount(),
            status: t.status(),
            reason: t.reason().map(str::to_owned),
        }
    }
}

/// An error as the API answers it.
#[derive(Debug)]
pub struct ApiError(Error);

/// A body that could not be read: too large, not JSON, or not the expected fields.
fn bad_body(rejection: JsonRejection) -> Response {
    let (status, code) = if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        (StatusCode::PAYLOAD_TOO_LARGE, "BODY_TOO_LARGE")
    } else {
        (StatusCode::BAD_REQUEST, "INVALID_BODY")
    };
    let body = ErrorBody {
        code: code.to_owned(),
        message: rejection.body_text(),
    };
    (status, Json(body)).into_response()
}

/// The JSON body of an error.
#[derive(Debug, Deserialize, Serialize)]
pub struct ErrorBody {
    /// Stable code: an invariant code or the code of a domain error (its
    /// `thalo::ErrorCode`), `REJECTED` (a domain error without a code), `CONFLICT`,
    /// `NOT_FOUND`, `EVENT_TOO_LARGE`, `INVALID_REQUEST`, `NOT_YET_PROJECTED` (504: a
    /// `Consistency: projected` command whose events the read models did not show in
    /// time; they are stored), `PROJECTION_STUCK` (503: a read model's stream is parked)
    /// or `INTERNAL`.
    pub code: String,
    /// For people.
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = match &self.0 {
            Error::Invariant { code, .. } => (StatusCode::UNPROCESSABLE_ENTITY, code.to_string()),
            Error::Conflict { .. } => (StatusCode::CONFLICT, "CONFLICT".to_owned()),
            Error::NotFound { .. } => (StatusCode::NOT_FOUND, "NOT_FOUND".to_owned()),
            Error::EventTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "EVENT_TOO_LARGE".to_owned())
            }
            // A domain error's own code when its type has one (`thalo::ErrorCode`).
            Error::Domain {
                code: Some(code), ..
            } => (StatusCode::UNPROCESSABLE_ENTITY, code.to_string()),
            Error::Domain { code: None, .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "REJECTED".to_owned())
            }
            Error::CommandIdReused { .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "IDEMPOTENCY_KEY_REUSED".to_owned(),
            ),
            Error::InvalidCommandId { .. } => (
                StatusCode::BAD_REQUEST,
                "INVALID_IDEMPOTENCY_KEY".to_owned(),
            ),
            // A request header the API does not understand (`Consistency`).
            Error::Config { .. } => (StatusCode::BAD_REQUEST, "INVALID_REQUEST".to_owned()),
            // `Consistency: projected`: the events are stored, the read models have not
            // shown them in time (or a stream is parked for one of them).
            Error::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "NOT_YET_PROJECTED".to_owned()),
            Error::Handler { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "PROJECTION_STUCK".to_owned(),
            ),
            _ => {
                tracing::error!(error = %self.0, "request failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL".to_owned())
            }
        };
        let body = ErrorBody {
            code,
            message: self.0.to_string(),
        };
        (status, Json(body)).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        ApiError(err)
    }
}

/// The answer to a command: its status, its events, and whether it was replayed from
/// an earlier execution under the same `Idempotency-Key`.
struct Executed {
    status: StatusCode,
    events: Vec<StoredEvent>,
    replayed: bool,
}

impl IntoResponse for Executed {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.events)).into_response();
        if self.replayed {
            response.headers_mut().insert(
                HeaderName::from_static(IDEMPOTENT_REPLAYED),
                HeaderValue::from_static("true"),
            );
        }
        response
    }
}

/// `metadata` with the request's W3C trace context (`traceparent`, `tracestate`), if it
/// has a valid one: the events it stores carry it through Kafka, and the consumers'
/// spans continue the caller's trace. An invalid value is ignored (the trace restarts
/// here), not refused.
fn with_trace_context(metadata: Metadata, headers: &HeaderMap) -> Metadata {
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    let Some(traceparent) = header(Metadata::TRACEPARENT) else {
        return metadata;
    };
    let metadata = metadata.with_traceparent(traceparent);
    match header(Metadata::TRACESTATE) {
        Some(tracestate) if metadata.traceparent().is_some() => {
            metadata.with_tracestate(tracestate)
        }
        _ => metadata,
    }
}

/// The request's `Idempotency-Key`, if it has one.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<CommandId>, Error> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = value.to_str().map_err(|_| Error::InvalidCommandId {
        reason: "it is not printable ASCII".to_owned(),
    })?;
    CommandId::new(key).map(Some)
}

async fn execute(
    state: &AppState,
    headers: &HeaderMap,
    id: String,
    command: BankAccountCommand,
    status: StatusCode,
) -> Result<Executed, ApiError> {
    crate::account::validate_account_number(&id)?;
    let key = idempotency_key(headers)?;
    let (stored, replayed) = run::<BankAccount>(state, headers, &id, key, command).await?;
    if wants_projected(headers)? {
        wait_until_projected(state, &stored).await?;
    }
    let events = stored.iter().map(view).collect::<Result<Vec<_>, Error>>()?;
    Ok(Executed {
        status,
        events,
        replayed,
    })
}

/// Executes `command` on aggregate `id` with the request's metadata (a new correlation
/// id, the caller's trace context), exactly once under the request's idempotency `key`
/// when it has one; the stored events, and whether they were replayed from the key's
/// record.
async fn run<A>(
    state: &AppState,
    headers: &HeaderMap,
    id: &A::Id,
    key: Option<CommandId>,
    command: A::Command,
) -> Result<(Vec<EventEnvelope<A::Event>>, bool), Error>
where
    A: thalo::Aggregate,
    A::Command: Clone,
{
    let metadata = Metadata::new()
        .with_correlation_id(Uuid::new_v4())
        .with_header("source", "bank-http");
    let metadata = with_trace_context(metadata, headers);
    let repository = &state.repository;
    Ok(match key {
        Some(key) => {
            let once = repository
                .execute_once_with::<A>(id, key, command, &metadata)
                .await?;
            let replayed = once.is_replayed();
            (once.into_events(), replayed)
        }
        None => (
            repository.execute_with::<A>(id, command, &metadata).await?,
            false,
        ),
    })
}

/// Whether the request asks for read-your-writes ([`CONSISTENCY`]).
fn wants_projected(headers: &HeaderMap) -> Result<bool, Error> {
    let Some(value) = headers.get(CONSISTENCY) else {
        return Ok(false);
    };
    match value.to_str() {
        Ok(value) if value.eq_ignore_ascii_case(CONSISTENCY_PROJECTED) => Ok(true),
        Ok(value) if value.eq_ignore_ascii_case("stored") => Ok(false),
        _ => Err(Error::config(format!(
            "the `{CONSISTENCY}` header must be `{CONSISTENCY_PROJECTED}` or `stored`"
        ))),
    }
}

/// Waits until the balances and the owners' view show `stored` (by their checkpoints
/// in Postgres, so it works whichever process runs the projections).
async fn wait_until_projected(
    state: &AppState,
    stored: &[EventEnvelope<BankAccountEvent>],
) -> Result<(), Error> {
    let store = state.repository.store();
    store
        .wait_until_projected(&state.balances, stored, PROJECTION_WAIT)
        .await?;
    store
        .wait_until_projected(&state.owners, stored, PROJECTION_WAIT)
        .await
}

fn view(envelope: &EventEnvelope<BankAccountEvent>) -> Result<StoredEvent, Error> {
    let payload = envelope.event.encode()?;
    Ok(StoredEvent {
        id: envelope.id,
        sequence: envelope.sequence,
        event_type: envelope.event.event_type().to_owned(),
        data: serde_json::from_str(&payload)
            .map_err(|e| Error::serialization(envelope.event.event_type(), e))?,
    })
}

async fn open(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<OpenAccount>, JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => return bad_body(rejection),
    };
    let command = BankAccountCommand::OpenAccount {
        owner: body.owner,
        initial_deposit: body.initial_deposit,
    };
    execute(
        &state,
        &headers,
        body.account_number,
        command,
        StatusCode::CREATED,
    )
    .await
    .into_response()
}

async fn deposit(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Json<Amount>, JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => return bad_body(rejection),
    };
    let command = BankAccountCommand::Deposit {
        amount: body.amount,
    };
    execute(&state, &headers, id, command, StatusCode::OK)
        .await
        .into_response()
}

async fn withdraw(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Json<Amount>, JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => return bad_body(rejection),
    };
    let command = BankAccountCommand::Withdraw {
        amount: body.amount,
    };
    execute(&state, &headers, id, command, StatusCode::OK)
        .await
        .into_response()
}

async fn close(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    execute(
        &state,
        &headers,
        id,
        BankAccountCommand::CloseAccount,
        StatusCode::OK,
    )
    .await
    .into_response()
}

/// The namespace of transfer ids derived from idempotency keys.
const TRANSFER_IDS: Uuid = Uuid::from_u128(0x5d0c_2b8e_61a4_4c1f_9f3e_7a44_b2d1_0e6b);

async fn transfer(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<TransferRequest>, JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => return bad_body(rejection),
    };
    request_transfer(&state, &headers, body)
        .await
        .into_response()
}

async fn request_transfer(
    state: &AppState,
    headers: &HeaderMap,
    body: TransferRequest,
) -> Result<Response, ApiError> {
    let key = idempotency_key(headers)?;
    // With a key, the id is the key's: a retry addresses the same transfer, and its
    // command is replayed from the record.
    let id = match &key {
        Some(key) => Uuid::new_v5(&TRANSFER_IDS, key.as_str().as_bytes()),
        None => Uuid::new_v4(),
    }
    .to_string();
    let command = TransferCommand::Request {
        from: body.from,
        to: body.to,
        amount: body.amount,
    };
    let (stored, replayed) = run::<Transfer>(state, headers, &id, key, command).await?;
    // The answer is the transfer as its request left it, replayed or not.
    let mut transfer = <Transfer as thalo::Aggregate>::new(id);
    for envelope in &stored {
        thalo::Aggregate::apply(&mut transfer, envelope.event.clone());
    }
    let mut response = (StatusCode::ACCEPTED, Json(TransferView::from(&transfer))).into_response();
    if replayed {
        response.headers_mut().insert(
            HeaderName::from_static(IDEMPOTENT_REPLAYED),
            HeaderValue::from_static("true"),
        );
    }
    Ok(response)
}

async fn show_transfer(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TransferView>, ApiError> {
    let loaded = state.repository.load::<Transfer>(&id).await?;
    if loaded.version == 0 {
        return Err(Error::NotFound {
            aggregate_type: "transfer".into(),
            aggregate_id: id,
        }
        .into());
    }
    Ok(Json(TransferView::from(&loaded.aggregate)))
}

async fn show_owner(
    State(state): State<AppState>,
    Path(owner): Path<String>,
) -> Result<Json<OwnerBalance>, ApiError> {
    match state.owners.get(&owner).await? {
        Some(row) => Ok(Json(row)),
        None => Err(Error::NotFound {
            aggregate_type: "owner".into(),
            aggregate_id: owner,
        }
        .into()),
    }
}

/// Liveness: the process is up and serving requests. (Whether Postgres and the broker
/// are reachable is readiness, which the operator issue adds.)
async fn healthz() -> &'static str {
    "ok"
}

/// 200 when every check passes, 503 when one fails (and from the moment shutdown
/// begins); the body lists every check.
async fn readyz(State(state): State<AppState>) -> Response {
    let report = state.readiness.check().await;
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report)).into_response()
}

/// The metrics in Prometheus' text format.
async fn metrics(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(handle) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            handle.render(),
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(ErrorBody {
                code: "NOT_FOUND".to_owned(),
                message: "metrics are not enabled in this service".to_owned(),
            }),
        )
            .into_response(),
    }
}

async fn list(State(state): State<AppState>) -> Result<Json<Vec<BalanceView>>, ApiError> {
    let rows = state.balances.all().await?;
    Ok(Json(rows.into_iter().map(BalanceView::from).collect()))
}

async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<BalanceView>, ApiError> {
    match state.balances.get(&id).await? {
        Some(row) => Ok(Json(row.into())),
        None => Err(Error::NotFound {
            aggregate_type: "bank_account".into(),
            aggregate_id: id,
        }
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                )
            })
            .collect()
    }

    #[test]
    fn the_request_trace_context_goes_into_the_metadata() {
        let metadata = with_trace_context(
            Metadata::new(),
            &headers(&[("traceparent", PARENT), ("tracestate", "rojo=1")]),
        );
        assert_eq!(metadata.traceparent(), Some(PARENT));
        assert_eq!(metadata.tracestate(), Some("rojo=1"));

        // None, or an invalid one: nothing is stored, and the request goes on.
        assert!(with_trace_context(Metadata::new(), &HeaderMap::new()).is_empty());
        let invalid = headers(&[("traceparent", "00-abc-01"), ("tracestate", "rojo=1")]);
        assert!(with_trace_context(Metadata::new(), &invalid).is_empty());
    }

    /// A domain error type of the kind an aggregate may return instead of
    /// `Error::invariant`.
    #[derive(Debug, PartialEq, thalo::ErrorCode)]
    enum OverdraftError {
        #[code("OVERDRAFT_LIMIT_EXCEEDED")]
        LimitExceeded,
    }

    impl std::fmt::Display for OverdraftError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("the overdraft limit would be exceeded")
        }
    }

    impl std::error::Error for OverdraftError {}

    async fn answer(error: Error) -> (StatusCode, ErrorBody) {
        let response = ApiError(error).into_response();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("the body");
        (
            status,
            serde_json::from_slice(&body).expect("an error body"),
        )
    }

    #[tokio::test]
    async fn a_coded_domain_error_is_422_with_its_code() {
        let (status, body) = answer(Error::coded(OverdraftError::LimitExceeded)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(body.code, "OVERDRAFT_LIMIT_EXCEEDED");
        assert_eq!(
            body.message,
            "command rejected: the overdraft limit would be exceeded"
        );

        // Without a code, a domain error is still a rejection, with the generic code.
        let (status, body) = answer(Error::domain(OverdraftError::LimitExceeded)).await;
        assert_eq!(
            (status, body.code.as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, "REJECTED")
        );

        // Invariants keep their code, as before.
        let (status, body) = answer(Error::invariant_code("ACCOUNT_CLOSED")).await;
        assert_eq!(
            (status, body.code.as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, "ACCOUNT_CLOSED")
        );
    }
}
