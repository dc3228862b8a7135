"""The OpenAPI 3.0 document for /api/v2 (kept next to the routes it describes)."""

from __future__ import annotations

from blueprints import DB_INT_MAX

_ERROR = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string"},
        "message": {"type": "string"},
        "parameter": {"type": "string"},
        "retry_after": {"type": "integer", "minimum": 0},
    },
}

_NULLABLE_STRING = {"type": "string", "nullable": True}
MAX_PAGE_SIZE = 200


def _id(description: str | None = None, *, nullable: bool = False) -> dict:
    """An id: the columns are INTEGER, so 1 up to 2**31 - 1."""
    schema: dict = {"type": "integer", "format": "int32", "minimum": 1, "maximum": DB_INT_MAX}
    if nullable:
        schema["nullable"] = True
    if description:
        schema["description"] = description
    return schema


def _date_time(description: str) -> dict:
    return {"type": "string", "format": "date-time", "description": description}


def _page_of(item_ref: str) -> dict:
    return {
        "type": "object",
        "required": ["results", "next"],
        "properties": {
            "results": {"type": "array", "items": {"$ref": item_ref}},
            "next": {"type": "string", "nullable": True, "description": "The next page, or null."},
        },
    }


def _errors() -> dict:
    return {
        "400": {
            "description": "A parameter is not valid.",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        },
        "401": {
            "description": "No valid API token or session.",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        },
        "429": {
            "description": "Too many requests from this token or address; retry after "
            "the number of seconds in Retry-After.",
            "headers": {"Retry-After": {"schema": {"type": "integer", "minimum": 0}}},
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        },
    }


_PAGING = [
    {
        "name": "cursor",
        "in": "query",
        "required": False,
        "description": "Where the next page starts (the `next` link carries it): the id of "
        "the last item already seen.",
        "schema": _id(),
    },
    {
        "name": "limit",
        "in": "query",
        "required": False,
        "description": f"Page size (default 50, at most {MAX_PAGE_SIZE}).",
        "schema": {"type": "integer", "format": "int32", "minimum": 1, "maximum": MAX_PAGE_SIZE},
    },
]


def openapi_document(server: str) -> dict:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Switchboard API",
            "version": "2.0.0",
            "description": "Devices and their activity log, scoped to the caller's tenant. "
            "Pages are newest first; follow `next` for older items.",
        },
        "servers": [{"url": server}],
        "security": [{"bearerAuth": []}],
        "paths": {
            "/api/v2/devices/": {
                "get": {
                    "operationId": "listDevices",
                    "summary": "Devices of your tenant",
                    "parameters": [
                        {
                            "name": "location",
                            "in": "query",
                            "required": False,
                            "schema": _id("Only devices at this location."),
                        },
                        {
                            "name": "online",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "enum": ["true", "false"]},
                        },
                        {
                            "name": "manufacturer",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string"},
                        },
                        *_PAGING,
                    ],
                    "responses": {
                        "200": {
                            "description": "A page of devices.",
                            "content": {
                                "application/json": {
                                    "schema": _page_of("#/components/schemas/Device")
                                }
                            },
                        },
                        **_errors(),
                    },
                }
            },
            "/api/v2/activity-logs/": {
                "get": {
                    "operationId": "listActivityLogs",
                    "summary": "Activity log of your tenant's devices and services",
                    "parameters": [
                        {
                            "name": "activity_type",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "status",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "enum": ["success", "warning", "error"]},
                        },
                        {
                            "name": "device",
                            "in": "query",
                            "required": False,
                            "schema": _id("Only activity of this device."),
                        },
                        {
                            "name": "service",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "since",
                            "in": "query",
                            "required": False,
                            "schema": _date_time(
                                "From this moment on (RFC 3339, with its offset)."
                            ),
                        },
                        {
                            "name": "until",
                            "in": "query",
                            "required": False,
                            "schema": _date_time("Before this moment (RFC 3339, with its offset)."),
                        },
                        *_PAGING,
                    ],
                    "responses": {
                        "200": {
                            "description": "A page of activity, newest first.",
                            "content": {
                                "application/json": {
                                    "schema": _page_of("#/components/schemas/ActivityLog")
                                }
                            },
                        },
                        **_errors(),
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": _ERROR,
                "Device": {
                    "type": "object",
                    "required": [
                        "id",
                        "api_device_id",
                        "manufacturer",
                        "kind",
                        "name",
                        "is_online",
                        "state",
                    ],
                    "properties": {
                        "id": _id(),
                        "api_device_id": {"type": "string"},
                        "manufacturer": {"type": "string"},
                        "kind": {"type": "string", "enum": ["receiver", "transmitter"]},
                        "name": {"type": "string"},
                        "model": {"type": "string"},
                        "firmware": {"type": "string"},
                        "ip_address": _NULLABLE_STRING,
                        "location_id": _id(nullable=True),
                        "is_online": {"type": "boolean"},
                        "last_seen": {"type": "string", "format": "date-time", "nullable": True},
                        "maintenance_mode": {"type": "boolean"},
                        "state": {"type": "object", "additionalProperties": True},
                    },
                },
                "ActivityLog": {
                    "type": "object",
                    "required": ["id", "activity_type", "status", "summary", "created_at"],
                    "properties": {
                        "id": _id(),
                        "activity_type": {"type": "string"},
                        "operation": {"type": "string"},
                        "status": {"type": "string", "enum": ["success", "warning", "error"]},
                        "summary": {"type": "string"},
                        "details": {"type": "object", "additionalProperties": True},
                        "device_id": _id(nullable=True),
                        "service_code": _NULLABLE_STRING,
                        "created_at": {"type": "string", "format": "date-time"},
                    },
                },
            },
        },
    }
