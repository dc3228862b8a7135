from app import create_app, settle_heap

app = create_app()
settle_heap(app)  # gunicorn imports this in each worker process, after forking
