"""The Dask farm: ``recorun WORKFLOW.yaml --executor dask`` (docs/FARM.md). Needs the ``farm``
extra (``pip install 'recorun[farm]'``)."""
