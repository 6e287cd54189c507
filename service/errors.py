"""Domain errors. Routes and services raise these; app.py maps them to HTTP in one place."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: a failure with a message meant for the client."""

    status_code = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RedisUnavailable(ServiceError):
    """Redis could not be reached or did not answer in time."""

    status_code = 503


class HistoryConflict(ServiceError):
    """A Redis key the service writes or reads holds another type (e.g. a foreign writer's
    string where a user's list belongs). Retrying cannot help until someone fixes the key."""

    status_code = 409


class ModelNotLoaded(ServiceError):
    """No bundle is loaded (only possible while starting or stopping)."""

    status_code = 503


class ShuttingDown(ServiceError):
    """The worker is stopping (or not yet serving): another worker or a retry will answer."""

    status_code = 503


class ClientGone(ServiceError):
    """The client closed the connection while its request waited: nobody reads the answer
    (499, nginx's code, so that metrics do not count it as the server's failure)."""

    status_code = 499


class ReloadFailed(ServiceError):
    """A new bundle was rejected; the previous model keeps serving."""

    status_code = 409


class AdminDisabled(ServiceError):
    """Admin endpoints are off because no admin token is configured."""

    status_code = 403


class Unauthorized(ServiceError):
    """Missing or wrong credentials: the admin token, or an API key on the data routes.
    `challenge` is the WWW-Authenticate header's value, which a 401 must carry (RFC 9110)."""

    status_code = 401

    def __init__(self, message: str, challenge: str) -> None:
        super().__init__(message)
        self.challenge = challenge
