"""What both processes read: the service's settings (settings.py) and the built-in chat templates."""
