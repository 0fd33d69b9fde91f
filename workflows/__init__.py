"""The workflows shipped with recorun (YAML files; the folder is a package so that an install
carries them: ``python -c "import recorun.workflows as w; print(w.__path__[0])"``)."""
