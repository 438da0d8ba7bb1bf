"""deforest's Hydra configuration (``pkg://deforest.conf``); importing it registers the
``${deforest_data_dir:}`` resolver that ``paths.data_dir`` uses."""

from deforest.core.paths import register_resolver

register_resolver()
