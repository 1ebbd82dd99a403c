"""The MKL code-path choice made when the package is imported (paddle_cae/_cpu_math.py)."""
from paddle_cae._cpu_math import cpu_vendor, select_mkl_code_path


def _cpuinfo(tmp_path, vendor):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: 25\n\n"
                    f"processor\t: 1\nvendor_id\t: {vendor}\n")
    return str(path)


def test_amd_cpu_gets_the_avx2_code_path(tmp_path):
    env = {}
    assert select_mkl_code_path(env, _cpuinfo(tmp_path, "AuthenticAMD")) == "5"
    assert env == {"MKL_DEBUG_CPU_TYPE": "5"}


def test_intel_cpu_and_unreadable_cpuinfo_are_left_alone(tmp_path):
    env = {}
    assert select_mkl_code_path(env, _cpuinfo(tmp_path, "GenuineIntel")) is None
    assert select_mkl_code_path(env, str(tmp_path / "missing")) is None
    assert env == {}
    assert cpu_vendor(str(tmp_path / "missing")) == ""


def test_a_value_chosen_by_the_user_is_kept(tmp_path):
    for value in ("2", ""):
        env = {"MKL_DEBUG_CPU_TYPE": value}
        assert select_mkl_code_path(env, _cpuinfo(tmp_path, "AuthenticAMD")) == value
        assert env == {"MKL_DEBUG_CPU_TYPE": value}


def test_isa_target_of_the_fused_kernels(tmp_path):
    from paddle_cae.fast.kernels.extension import isa_target

    def target(flags):
        path = tmp_path / "cpuinfo"
        path.write_text(f"vendor_id\t: X\nflags\t\t: {flags}\n")
        return isa_target(str(path))

    assert target("sse2 avx2 fma avx512f avx512dq avx512bw avx512vl")[0] == "avx512"
    assert target("sse2 avx2 fma avx512f") == ("avx2", ["-mavx2", "-mfma"])
    assert target("sse2 avx") == ("generic", [])
    assert isa_target(str(tmp_path / "missing")) == ("generic", [])
