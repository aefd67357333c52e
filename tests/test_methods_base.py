import torch

from n2ce_distill.methods import Processes


def test_each_process_keeps_its_slice_of_one_global_draw():
    """Processes 0..3 of 4, each drawing 3 rows from the same stream, together hold the 12-row global draw."""
    def draw_on(index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(7)
        return Processes(index, 4).draw(lambda n: torch.randn(n, 2, generator=generator), 3)

    torch.testing.assert_close(torch.cat([draw_on(i) for i in range(4)]),
                               torch.randn(12, 2, generator=torch.Generator().manual_seed(7)))
    torch.manual_seed(1)
    alone = Processes().randn(5, 2, device=torch.device("cpu"))
    torch.manual_seed(1)
    torch.testing.assert_close(alone, torch.randn(5, 2))  # one process: the plain draw
    stat = torch.tensor([1.0, 3.0])
    assert Processes().mean(stat) is stat  # nothing to average without a process group


def test_nets_name_the_wrapped_and_the_bare_module_apart():
    """After the trainer wraps a network (DDP holds it as .module), train[...] is the wrapper and read[...] the
    module itself; nothing else reaches it."""
    from torch import nn

    from n2ce_distill.methods import Nets

    nets, critic = Nets(), nn.Linear(2, 1)
    nets["critic"] = critic
    assert nets.train["critic"] is critic and nets.read["critic"] is critic and "critic" in nets

    class Wrapper(nn.Module):  # what DistributedDataParallel looks like from outside
        def __init__(self, module):
            super().__init__()
            self.module = module

    nets.train = {"critic": Wrapper(critic)}
    assert isinstance(nets.train["critic"], Wrapper) and nets.read["critic"] is critic
    assert not hasattr(nets, "__getitem__")  # no view that hides which one a call gets
