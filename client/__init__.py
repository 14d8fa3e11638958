"""The hospital side: the Flower ClientApp, the site's data and cache, the local CPS trainer."""
