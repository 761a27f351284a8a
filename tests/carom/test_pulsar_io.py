"""The C++ client's logger is filtered in C++, never by a Python ``logging.Logger``."""

from __future__ import annotations

import logging
import os

import pulsar

from carom.pulsar_io import quiet_logger


def test_quiet_logger_filters_in_cpp() -> None:
    # A Python logger would be called for every DEBUG line (~10 per message; measured).
    warn = quiet_logger()
    assert isinstance(warn, pulsar.ConsoleLogger)
    assert warn.log_level == pulsar.LoggerLevel.Warn
    err = quiet_logger(logging.ERROR)
    assert isinstance(err, pulsar.ConsoleLogger) and err.log_level == pulsar.LoggerLevel.Error
    silent = quiet_logger(100)
    assert isinstance(silent, pulsar.FileLogger) and silent.log_file == os.devnull
