"""mechq's bundled fact set (see README.md here). A package only so that wheels ship it as
``mechq.data``; mechq reads the files through :data:`mechq.facts.DATA_DIR`."""
