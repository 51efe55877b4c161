"""What `agent` and `run` share: the one grace deadline, counted from the
first trigger (preStop, a signal, the app's exit), and the control server
that serves /prestop into it."""
from __future__ import annotations

from .clock import Deadline
from .config import AgentConfig
from .core import Registrar
from .errors import ConfigError
from .fields import read_token
from .signals import SignalPipe
from .stopping import StopReport, Trigger


class Lifecycle:
    """The first trigger fixes the deadline; every trigger joins one stop.
    ``reserve`` seconds of the budget are kept for what comes after the
    registry steps (the app's own shutdown in `run` mode)."""

    def __init__(self, registrar: Registrar, pipe: SignalPipe | None = None, reserve: float = 0.0):
        self.registrar = registrar
        self.pipe = pipe
        self.reserve = reserve
        self._triggers: list[tuple[Trigger, float]] = []

    def note(self, trigger: str | Trigger) -> None:
        self._triggers.append((Trigger.of(trigger), self.registrar.clock.now()))
        if self.pipe is not None:
            self.pipe.wake()

    @property
    def triggered(self) -> bool:
        return bool(self._triggers)

    @property
    def first(self) -> Trigger:
        return self._triggers[0][0]

    @property
    def first_at(self) -> float:
        return self._triggers[0][1]

    @property
    def deadline(self) -> Deadline:
        """The end of the whole stop budget, from the first trigger."""
        return Deadline.after(self.registrar.stop_config.budget, self.registrar.clock,
                              start=self.first_at)

    def stop(self, trigger: str | Trigger) -> StopReport:
        """Run or join the stop sequence (the registry steps end ``reserve``
        seconds before the deadline)."""
        self.note(trigger)
        end = self.deadline
        return self.registrar.stop(self.first, Deadline(end.at - self.reserve, end.clock))


def serve_control(registrar: Registrar, config: AgentConfig, life: Lifecycle, ready=None):
    """The control server, started, or None when ``control.listen`` is null."""
    if config.control.listen is None:
        return None
    from .control import ControlServer

    token = (read_token(config.control.token_file, "control.token_file")
             if config.control.token_file else None)
    try:
        server = ControlServer(registrar, config.control.listen,
                               lambda: life.stop(Trigger.prestop("/prestop")), token=token,
                               ready=ready)
    except OSError as exc:
        raise ConfigError("control.listen", f"cannot listen on {config.control.listen}: "
                                            f"{exc.strerror or exc}") from None
    return server.start()
