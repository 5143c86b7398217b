"""Run one command as N local processes of a multi-process JAX run, to try it on one machine.

    KERAS_BACKEND=jax .venv/bin/python -m examples.launch --num-processes 2 -- \\
        .venv/bin/python -m examples.train_inception --quick --output-dir /tmp/two

picks a free local port for the coordinator and starts the command N times, each with Keras's
KERAS_DISTRIBUTION_JOB_ADDRESSES, KERAS_DISTRIBUTION_NUM_PROCESSES and
KERAS_DISTRIBUTION_PROCESS_ID set (what `examples.cli.add_process_arguments` falls back to, and
what `keras.distribution.initialize()` reads), KERAS_BACKEND=jax and one CPU device each unless
the environment says otherwise. Process 0's output streams to this terminal; the others' go to
--log-dir (or are discarded). If one process fails, or on Ctrl-C, every process is stopped: the
others would wait for it in their next collective. The exit status is 0 when every process
succeeded, else the first failure's (1 for a process killed by a signal or by --timeout).

On several hosts, run the command itself on each with the three variables (or
`--num-processes`, `--process-id` and `--coordinator`), and process 0's reachable address.
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from examples.cli import positive_int

POLL_SECONDS = 0.2
STOP_SECONDS = 10  # after SIGTERM, before SIGKILL


def free_port(host="127.0.0.1"):
    """A TCP port free on `host` now (the coordinator binds it a moment later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_environment(process_id, num_processes, coordinator, base=None):
    """The environment of process `process_id`: `base` (default `os.environ`) with the Keras
    distribution variables, the JAX backend unless one is set, and, unless XLA_FLAGS or
    JAX_PLATFORMS say otherwise, JAX on the CPU (one device per process)."""
    env = dict(os.environ if base is None else base)
    env.update({
        "KERAS_DISTRIBUTION_JOB_ADDRESSES": coordinator,
        "KERAS_DISTRIBUTION_NUM_PROCESSES": str(num_processes),
        "KERAS_DISTRIBUTION_PROCESS_ID": str(process_id),
    })
    env.setdefault("KERAS_BACKEND", "jax")
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def launch(command, num_processes, *, log_dir=None, timeout=None, host="127.0.0.1"):
    """Run `command` (a list of arguments) as `num_processes` local processes; return the exit
    status (0 when all succeeded).

    Raises:
        ValueError: for an empty command or fewer than one process.
    """
    if not command:
        raise ValueError("Give the command to run after `--`. Received: nothing")
    if num_processes < 1:
        raise ValueError(f"--num-processes must be at least 1. Received: {num_processes}")
    coordinator = f"{host}:{free_port(host)}"
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    processes, logs = [], []
    try:
        for process_id in range(num_processes):
            if process_id == 0:
                output = None  # this terminal
            elif log_dir:
                output = open(os.path.join(log_dir, f"process_{process_id}.log"), "w")
                logs.append(output)
            else:
                output = subprocess.DEVNULL
            processes.append(subprocess.Popen(
                command,
                env=process_environment(process_id, num_processes, coordinator),
                stdout=output,
                stderr=subprocess.STDOUT if output is not None else None,
                # Its own process group, so that stopping it stops what it started too.
                start_new_session=True,
            ))
        return _wait(processes, timeout)
    except KeyboardInterrupt:
        print("launch: interrupted; stopping every process", file=sys.stderr)
        return 130
    finally:
        _stop(processes)
        for log in logs:
            log.close()


def _wait(processes, timeout):
    """The exit status once every process has ended, or as soon as one fails or time is up."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        codes = [process.poll() for process in processes]
        failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            process_id, code = failed[0]
            print(f"launch: process {process_id} exited with status {code}; stopping the others",
                  file=sys.stderr)
            return code if code > 0 else 1
        if all(code == 0 for code in codes):
            return 0
        if deadline is not None and time.monotonic() > deadline:
            print(f"launch: still running after {timeout} s; stopping every process",
                  file=sys.stderr)
            return 1
        time.sleep(POLL_SECONDS)


def _stop(processes):
    """SIGTERM to every running process's group, then SIGKILL to those still running."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + STOP_SECONDS
    for process in running:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()


def _signal_group(process, signum):
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        usage="python -m examples.launch [--num-processes N] [--log-dir DIR] [--timeout S] "
              "-- COMMAND ...",
    )
    parser.add_argument("--num-processes", type=positive_int, default=2, help="processes to start")
    parser.add_argument("--log-dir", default=None,
                        help="folder for the output of processes 1..N-1 (default: discarded)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds before every process is stopped (default: none)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the command every process runs, after `--`")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        return launch(command, args.num_processes, log_dir=args.log_dir, timeout=args.timeout)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
