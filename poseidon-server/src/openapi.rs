//! The OpenAPI document, generated from the handlers' annotations and the wire types, served at
//! `GET /api/v1/openapi.json`. Route and schema names follow Poseidon's spec.

use axum::Json;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::openapi::{Content, Ref, RefOr};
use utoipa::{Modify, OpenApi};

use crate::dto;
use crate::error;
use crate::routes;

/// Poseidon's API v1 as this server implements it.
#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "Poseidon API", description = "This API is used by CodeOcean to run code in runners."),
    servers((url = "/api/v1")),
    paths(
        routes::health,
        routes::version,
        routes::statistics,
        routes::runners::provide,
        routes::runners::delete,
        routes::runners::update_files,
        routes::runners::list_files,
        routes::runners::file_content,
        routes::runners::execute,
        routes::runners::websocket,
        routes::environments::list,
        routes::environments::get,
        routes::environments::put,
        routes::environments::delete,
    ),
    components(schemas(
        dto::ExecutionEnvironment,
        dto::ExecutionEnvironmentList,
        dto::EnvironmentStatisticsEntry,
        dto::ProvideRunnerRequest,
        dto::RunnerResponse,
        dto::MappedPortDto,
        dto::ExecutionRequestDto,
        dto::ExecutionResponse,
        dto::FileUpdateRequest,
        dto::FileCopyDto,
        dto::FileHeader,
        dto::FileListing,
        error::ClientError,
        error::InternalServerError,
        error::ErrorCode,
    )),
    modifiers(&TokenScheme),
    tags(
        (name = "runner", description = "A unit of execution"),
        (name = "execution environment", description = "A template for runners"),
        (name = "miscellaneous"),
    )
)]
pub struct ApiDoc;

struct TokenScheme;

impl Modify for TokenScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "poseidonAuthToken",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "Poseidon-Token",
                "A security token that might be required depending on the configuration.",
            ))),
        );
        // The peer spec's named responses, so tools that reference them find them.
        let json = |description: &str, schema: &str| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(description)
                    .content(
                        "application/json",
                        Content::new(Some(Ref::from_schema_name(schema))),
                    )
                    .build(),
            )
        };
        let empty =
            |description: &str| RefOr::T(ResponseBuilder::new().description(description).build());
        let responses = [
            ("BadRequest", json("Request is invalid.", "ClientError")),
            ("Unauthorized", empty("Client could not be authenticated")),
            (
                "NotFound",
                empty("The entity with the given identifier does not exist."),
            ),
            (
                "RunnerGone",
                json("The runner is not available any longer.", "ClientError"),
            ),
            (
                "FailedFileDependency",
                json("The file is not available.", "ClientError"),
            ),
            (
                "InternalServerError",
                json("Request could not be handled", "InternalServerError"),
            ),
        ];
        for (name, response) in responses {
            components.responses.insert(name.to_string(), response);
        }
    }
}

/// `GET /api/v1/openapi.json`.
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
