"""Generated from proto/cabincrew/v1 by `make proto`; do not edit."""
