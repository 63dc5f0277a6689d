//! The HTTP API:
//!
//! | request | does | answers |
//! | --- | --- | --- |
//! | `POST /members/{id}` `{"name"}` | joins | 200 [`Executed`] |
//! | `POST /members/{id}/loans` `{"book"}` | borrows a book | 200 [`Executed`] |
//! | `DELETE /members/{id}/loans/{book}` | returns it | 200 [`Executed`] |
//! | `GET /members/{id}/loans` | reads the `loans` read model | 200 `[Loan]` |
//!
//! A command answers once the `loans` read model shows its events (read-your-writes), so
//! the client's next `GET` sees it. Errors are [`ErrorBody`]: 422 with the rejection's
//! code (`NOT_A_MEMBER`, `LOAN_LIMIT_REACHED`, ...), 504 `NOT_YET_PROJECTED` when the read
//! model did not catch up in time (the events are stored), 500 `INTERNAL`.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use thalo::{Error, Metadata, Repository};
use thalo_postgres::PgEventStore;
use uuid::Uuid;

use crate::loans::{Loan, Loans};
use crate::member::{Member, MemberCommand, MemberId};

/// The header that carries a request's correlation id. A request without a valid one
/// gets a new id.
pub const CORRELATION_ID: &str = "x-correlation-id";

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct AppState {
    /// Runs commands on the store.
    pub repository: Repository<PgEventStore>,
    /// The read model, for reads and for read-your-writes.
    pub loans: Loans,
    /// How long a command waits for the read model to show its events.
    pub projection_timeout: Duration,
}

/// The routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/members/{id}", post(join))
        .route("/members/{id}/loans", post(borrow).get(loans))
        .route("/members/{id}/loans/{book}", delete(return_book))
        .with_state(state)
}

#[derive(Debug, Deserialize)]
struct JoinBody {
    name: String,
}

#[derive(Debug, Deserialize)]
struct BorrowBody {
    book: String,
}

/// A command's answer, sent once the read model shows it.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Executed {
    /// The member's version after the command: the sequence of their last event.
    pub version: u64,
    /// The correlation id stored with the events.
    pub correlation_id: Uuid,
}

async fn join(
    State(app): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<JoinBody>,
) -> Result<Json<Executed>, ApiError> {
    let command = MemberCommand::Join { name: body.name };
    app.execute(MemberId(id), command, &headers).await
}

async fn borrow(
    State(app): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<BorrowBody>,
) -> Result<Json<Executed>, ApiError> {
    let command = MemberCommand::Borrow { book: body.book };
    app.execute(MemberId(id), command, &headers).await
}

async fn return_book(
    State(app): State<AppState>,
    Path((id, book)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Executed>, ApiError> {
    let command = MemberCommand::ReturnBook { book };
    app.execute(MemberId(id), command, &headers).await
}

async fn loans(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Vec<Loan>>, ApiError> {
    Ok(Json(app.loans.of(&MemberId(id)).await?))
}

impl AppState {
    /// Runs `command` with the request's correlation id, then waits until the `loans`
    /// read model shows the stored events: the relay has published them, the consumer
    /// has applied them and committed its checkpoint.
    async fn execute(
        &self,
        member: MemberId,
        command: MemberCommand,
        headers: &HeaderMap,
    ) -> Result<Json<Executed>, ApiError> {
        let correlation_id = headers
            .get(CORRELATION_ID)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| Uuid::parse_str(value).ok())
            .unwrap_or_else(Uuid::new_v4);
        let metadata = Metadata::new().with_correlation_id(correlation_id);
        let stored = self
            .repository
            .execute_with::<Member>(&member, command, &metadata)
            .await?;
        self.repository
            .store()
            .wait_until_projected(&self.loans, &stored, self.projection_timeout)
            .await?;
        let version = stored.last().map_or(0, |event| event.sequence);
        Ok(Json(Executed {
            version,
            correlation_id,
        }))
    }
}

/// The body of every error answer.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable code for programs.
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
}

/// A [`thalo::Error`] as an HTTP answer.
#[derive(Debug)]
pub struct ApiError(Error);

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        ApiError(error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message) = match (&self.0, self.0.code()) {
            // A rejected command: `LoanError`'s code, from `#[derive(ErrorCode)]`.
            (err, Some(code)) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                code.to_owned(),
                err.to_string(),
            ),
            (Error::Timeout { .. }, None) => (
                StatusCode::GATEWAY_TIMEOUT,
                "NOT_YET_PROJECTED".to_owned(),
                "stored, but not shown by the read model yet".to_owned(),
            ),
            // The member's stream is parked for the projection (an event failed):
            // the read model waits for an operator (`thalo parked`).
            (Error::Handler { .. }, None) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "PROJECTION_STUCK".to_owned(),
                self.0.to_string(),
            ),
            (err, None) => {
                tracing::error!(error = %err, "request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "INTERNAL".to_owned(),
                    "internal error".to_owned(),
                )
            }
        };
        (status, Json(ErrorBody { code, message })).into_response()
    }
}
