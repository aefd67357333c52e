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
