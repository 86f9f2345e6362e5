"""The stages: bind, route, pair, extract, evaluate, and the pipeline that chains them."""
