"""Windows only: tie a run process's life to Slicer's with a Job Object (JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE).

Windows closes every handle of a process that ends, normally or not; when the last handle to the job closes, the
processes in it are killed. So a run cannot outlive a Slicer that was killed or crashed (on POSIX the command line
watches FEWSHOTSAM2_PARENT_PID instead). Nothing here runs on other systems; failures only log a warning (the run
still works, it just is not tied to Slicer).
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Optional

JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE = 0x2000
JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS = 9  # JobObjectExtendedLimitInformation


class _IoCounters(ctypes.Structure):
    _fields_ = [(name, ctypes.c_ulonglong) for name in (
        "ReadOperationCount", "WriteOperationCount", "OtherOperationCount",
        "ReadTransferCount", "WriteTransferCount", "OtherTransferCount")]


class _BasicLimitInformation(ctypes.Structure):
    _fields_ = [
        ("PerProcessUserTimeLimit", ctypes.c_int64),  # LARGE_INTEGER
        ("PerJobUserTimeLimit", ctypes.c_int64),
        ("LimitFlags", ctypes.c_uint32),  # DWORD
        ("MinimumWorkingSetSize", ctypes.c_size_t),  # SIZE_T
        ("MaximumWorkingSetSize", ctypes.c_size_t),
        ("ActiveProcessLimit", ctypes.c_uint32),
        ("Affinity", ctypes.c_size_t),  # ULONG_PTR
        ("PriorityClass", ctypes.c_uint32),
        ("SchedulingClass", ctypes.c_uint32),
    ]


class _ExtendedLimitInformation(ctypes.Structure):
    _fields_ = [
        ("BasicLimitInformation", _BasicLimitInformation),
        ("IoInfo", _IoCounters),
        ("ProcessMemoryLimit", ctypes.c_size_t),
        ("JobMemoryLimit", ctypes.c_size_t),
        ("PeakProcessMemoryUsed", ctypes.c_size_t),
        ("PeakJobMemoryUsed", ctypes.c_size_t),
    ]


def _kernel32():
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.CreateJobObjectW.restype = wintypes.HANDLE
    kernel32.CreateJobObjectW.argtypes = (ctypes.c_void_p, wintypes.LPCWSTR)
    kernel32.SetInformationJobObject.restype = wintypes.BOOL
    kernel32.SetInformationJobObject.argtypes = (wintypes.HANDLE, ctypes.c_int, ctypes.c_void_p, wintypes.DWORD)
    kernel32.AssignProcessToJobObject.restype = wintypes.BOOL
    kernel32.AssignProcessToJobObject.argtypes = (wintypes.HANDLE, wintypes.HANDLE)
    kernel32.CloseHandle.restype = wintypes.BOOL
    kernel32.CloseHandle.argtypes = (wintypes.HANDLE,)
    return kernel32


def killOnCloseJob(popen) -> Optional[int]:
    """Put a just-started subprocess.Popen into a new kill-on-close job; returns the job handle (keep it open as
    long as the run may go on, then `close` it), or None (not Windows, or the job could not be made)."""
    if os.name != "nt":
        return None
    try:
        kernel32 = _kernel32()
        job = kernel32.CreateJobObjectW(None, None)
        if not job:
            raise ctypes.WinError(ctypes.get_last_error())
        info = _ExtendedLimitInformation()
        info.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
        if not kernel32.SetInformationJobObject(job, JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS, ctypes.byref(info),
                                                ctypes.sizeof(info)):
            error = ctypes.WinError(ctypes.get_last_error())
            kernel32.CloseHandle(job)
            raise error
        # Popen._handle: the process handle subprocess keeps on Windows (PROCESS_ALL_ACCESS)
        if not kernel32.AssignProcessToJobObject(job, int(popen._handle)):
            error = ctypes.WinError(ctypes.get_last_error())
            kernel32.CloseHandle(job)
            raise error
        return job
    except Exception as exc:  # noqa: BLE001  (never fail a run for this)
        logging.warning("FewShotSAM2: the run is not tied to Slicer's lifetime (Job Object: %s)", exc)
        return None


def close(job: Optional[int]) -> None:
    """Close the job handle: a process still in the job is killed (call after the run ended or was cancelled)."""
    if job is None or os.name != "nt":
        return
    try:
        _kernel32().CloseHandle(job)
    except Exception as exc:  # noqa: BLE001
        logging.warning("FewShotSAM2: closing the Job Object failed: %s", exc)
