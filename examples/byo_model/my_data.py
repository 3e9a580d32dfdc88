"""Your calibration data, as bntool imports it: `--loader my_data:calibration_loader --input-key image`.

Return any iterable of batches: a DataLoader, a list, a generator function's result. A batch may be a
tensor, a tuple/list whose first item is the input, or a dict (name the input with --input-key). Here: a
DataLoader over generated images, yielding dicts as many pipelines (HF datasets, webdataset) do.
"""

import torch
from torch.utils.data import DataLoader, Dataset


class Generated(Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"image": torch.randn(3, 32, 32, generator=g) * 0.8 + 0.2, "label": i % 10}


def calibration_loader(n: int = 256, batch_size: int = 32) -> DataLoader:
    return DataLoader(Generated(n), batch_size=batch_size, shuffle=False)
