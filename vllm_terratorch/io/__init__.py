"""IO processors for TerraTorch models: request schema, data sources, settings and image tiling."""
