"""The bottom layer: contracts, schemas and shared tools, importing no other layer of genlab (see
``lab_utils/__init__.py``). Import the module you need (``lab_utils.core.lab``, ``lab_utils.core.config`` ...):
this file imports nothing, so that importing one core module loads only what that module needs."""
