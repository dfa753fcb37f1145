"""The client side: helpers for web apps and the offline bulk runner."""
