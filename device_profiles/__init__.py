"""Device profiles (TOML files) shipped as package data."""
