"""The tests' CUDA emulator (python_tests/cuda_emulation) reports each kind of kernel mistake it
claims to check (emulator_selftest.cpp plants one per case), exposes a data race through its thread
orders, and runs a correct warp reduction."""
import ctypes
import re

import numpy as np
import pytest


def run_case(lib, which):
    message = ctypes.create_string_buffer(1024)
    out = np.zeros(64, dtype=np.float32)
    lib.emu_selftest(which, message, len(message), out.ctypes.data_as(ctypes.c_void_p))
    return message.value.decode(), out


@pytest.mark.parametrize("which,expected", [
    (0, "while others wait at"),
    (1, "exited.*__syncthreads|__syncthreads.*exited"),
    (2, "exited while its warp waits|does not exist or has exited"),
    (3, "past the end of dynamic shared memory"),
    (4, "past the end of out"),
    (6, "over the limit"),
    (9, "undefined behaviour trapped"),
    (10, "undefined behaviour trapped"),
])
def test_each_mistake_is_reported(cuda_emulator, which, expected):
    error, _ = run_case(cuda_emulator, which)
    assert re.search(expected, error), error


def test_unwritten_shared_memory_reads_as_nan(cuda_emulator):
    error, out = run_case(cuda_emulator, 5)
    assert error == ""
    assert np.isnan(out[63]) and not np.isnan(out[:63]).any()


def test_warp_shuffles_sum_each_warp(cuda_emulator):
    error, out = run_case(cuda_emulator, 7)
    assert error == ""
    np.testing.assert_array_equal(out, np.repeat([sum(range(32)), sum(range(32, 64))], 32))


def test_a_race_shows_as_results_that_depend_on_the_thread_order(cuda_emulator):
    results = []
    for schedule in (0, 1, 2):
        cuda_emulator.emu_set_schedule(schedule)
        error, out = run_case(cuda_emulator, 8)
        assert error == ""
        results.append(out)
    cuda_emulator.emu_set_schedule(0)
    assert np.isnan(results[0][:63]).all()  # ascending: each neighbour runs after the read
    np.testing.assert_array_equal(results[1][:63], np.arange(1, 64))  # descending: before it
    assert not np.array_equal(np.isnan(results[2]), np.isnan(results[0]))
