import pytest

from ggfwd.errors import UserError
from ggfwd.profiles import builtin_profiles, load_profile


def test_shipped_profiles_load():
    names = builtin_profiles()
    assert "laptop-2core" in names
    for name in names:
        p = load_profile(name)
        assert p.name == name and p.threads >= 1
        assert (p.tokens_per_second is None) == (p.measured == "")  # a speed always says how it was measured


def test_bad_profiles(tmp_path):
    (tmp_path / "bad.toml").write_text('name = "x"\ndescription = ""\nbackend = "tpu"\nthreads = 2\nmemory_mib = 512\n')
    with pytest.raises(UserError, match="backend"):
        load_profile(str(tmp_path / "bad.toml"))
    (tmp_path / "extra.toml").write_text('name = "x"\ncolour = "red"\n')
    with pytest.raises(UserError, match="unknown keys"):
        load_profile(str(tmp_path / "extra.toml"))
    with pytest.raises(UserError, match="unknown device profile"):
        load_profile("nope")
