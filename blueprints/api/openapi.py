"""The OpenAPI 3.0 document for /api/v2 (kept next to the routes it describes)."""

from __future__ import annotations

_ERROR = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string"},
        "message": {"type": "string"},
        "parameter": {"type": "string"},
    },
}

_NULLABLE_STRING = {"type": "string", "nullable": True}
INT64_MAX = 2**63 - 1


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
    }


_PAGING = [
    {
        "name": "cursor",
        "in": "query",
        "required": False,
        "description": "Where the next page starts (the `next` link carries it): the id of "
        "the last item already seen.",
        "schema": {"type": "integer", "format": "int64", "minimum": 1, "maximum": INT64_MAX},
    },
    {
        "name": "limit",
        "in": "query",
        "required": False,
        "description": "Page size (default 50).",
        "schema": {"type": "integer", "minimum": 1, "maximum": 200},
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
                            "schema": {"type": "integer", "minimum": 0, "maximum": INT64_MAX},
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
                            "schema": {"type": "integer", "minimum": 0, "maximum": INT64_MAX},
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
                            "schema": {"type": "string", "format": "date-time"},
                        },
                        {
                            "name": "until",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "format": "date-time"},
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
                        "id": {"type": "integer"},
                        "api_device_id": {"type": "string"},
                        "manufacturer": {"type": "string"},
                        "kind": {"type": "string", "enum": ["receiver", "transmitter"]},
                        "name": {"type": "string"},
                        "model": {"type": "string"},
                        "firmware": {"type": "string"},
                        "ip_address": _NULLABLE_STRING,
                        "location_id": {"type": "integer", "nullable": True},
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
                        "id": {"type": "integer"},
                        "activity_type": {"type": "string"},
                        "operation": {"type": "string"},
                        "status": {"type": "string", "enum": ["success", "warning", "error"]},
                        "summary": {"type": "string"},
                        "details": {"type": "object", "additionalProperties": True},
                        "device_id": {"type": "integer", "nullable": True},
                        "service_code": _NULLABLE_STRING,
                        "created_at": {"type": "string", "format": "date-time"},
                    },
                },
            },
        },
    }
