"""Second-order optimizers on the shared capture and block code (see :mod:`fisherlab.optim.base`).

Example:
    >>> import torch, fisherlab as fl
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> opt = fl.optim.TENGraD(model, lr=0.1, damping=1e-3)
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> opt.zero_grad(); loss = torch.nn.functional.cross_entropy(model(x), y); loss.backward()
    >>> opt.step(); opt.close()
"""

from fisherlab.optim.base import CurvatureOptimizer
from fisherlab.optim.ekfac import EKFAC, EKFACra
from fisherlab.optim.fngd import FNGD
from fisherlab.optim.kfac import KFAC
from fisherlab.optim.skfac import SKFAC
from fisherlab.optim.tengrad import TENGraD

OPTIMIZERS = {
    "kfac": KFAC,
    "ekfac": EKFAC,
    "ekfac-ra": EKFACra,
    "tengrad": TENGraD,
    "skfac": SKFAC,
    "fngd": FNGD,
}

__all__ = [
    "EKFAC",
    "FNGD",
    "KFAC",
    "OPTIMIZERS",
    "SKFAC",
    "CurvatureOptimizer",
    "EKFACra",
    "TENGraD",
]
