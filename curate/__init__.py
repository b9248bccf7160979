"""The science of curation as plain functions on arrays and tables (no Dask, no CLI)."""
