"""The FastAPI retrieval service (`remi-serve`)."""

from remi_core.threads import prepare_environment

# Before any service module imports torch or faiss: OpenMP reads its settings once, when it
# loads. Also covers workers started without remi-serve (`uvicorn service.app:create_app`).
prepare_environment("passive")
