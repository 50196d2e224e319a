# Integration fixtures: each helper module registers its fixtures here.
from tests.integration.docker_fixtures import *  # noqa: F403
from tests.integration.ssh_fixtures import *  # noqa: F403
