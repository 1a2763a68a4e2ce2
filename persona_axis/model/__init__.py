"""Loading a chat model: the handle and its chat template, where weights come from, int8, weight layout."""
