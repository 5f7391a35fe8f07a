"""Bring your own LSE network: train it in a plain torch loop, export it, serve it, ask it.

    .venv/bin/python examples/byom_tutorial.py [--repository DIR]

Runs in about half a minute on a laptop CPU; CI runs it (tests/hjmodel/test_byom.py). The README's
tutorial is the part between the ``tutorial:`` markers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main(repository: Path) -> dict:
    # tutorial: begin
    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    import hjmodel

    X, y = load_digits(return_X_y=True)                       # 1797 images of 8x8 pixels, 10 classes
    X_train, X_rest, y_train, y_rest = train_test_split(X, y, test_size=0.4, random_state=0)
    X_cal, X_test, y_cal, y_test = train_test_split(X_rest, y_rest, test_size=0.5, random_state=0)

    # 1. your model, your loop: any optimiser, any data loader, CPU or GPU
    torch.manual_seed(0)
    model = hjmodel.nn.LSEClassifier(64, n_classes=10, pieces=8, eps=1.0,
                                     mean=X_train.mean(0), scale=X_train.std(0))
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    data = torch.utils.data.TensorDataset(torch.tensor(X_train, dtype=torch.float32), torch.tensor(y_train))
    for _epoch in range(40):
        for xb, yb in torch.utils.data.DataLoader(data, batch_size=128, shuffle=True):
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()

    # 2. export: calibrates the OOD gate on rows the model never trained on, writes ONNX + torch
    hjmodel.export(model, calibration_data=(X_cal, y_cal), reference_data=X_train,
                   out=repository / "my_digits" / "1", class_names=[str(k) for k in range(10)])

    # 3. serve it:  hjserve --model-repository <repository> --grpc-port 8001   (below: a real server)
    import tritonclient.grpc as grpcclient

    from service.testing import run_server

    with run_server(repository, repository, grpc=True) as server:
        client = grpcclient.InferenceServerClient(server.grpc_target)
        inp = grpcclient.InferInput("input", [len(X_test), 64], "FP32")
        inp.set_data_from_numpy(X_test.astype(np.float32))
        result = client.infer("my_digits", [inp], parameters={"diagnostics": "ood_p_value"})
        predicted = result.as_numpy("prediction")
        radius = result.as_numpy("certified_radius")
        flagged = result.as_numpy("ood_flag")
        client.close()
    # tutorial: end

    summary = {"accuracy": float((predicted == y_test).mean()),
               "module_agrees": bool((model(torch.tensor(X_test)).argmax(1).numpy() == predicted).all()),
               "median_certified_radius": float(np.median(radius)), "ood_flag_rate": float(flagged.mean()),
               "rows": int(len(X_test))}
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, help="model repository to write (default: a temporary one)")
    args = parser.parse_args()
    repository = args.repository or Path(tempfile.mkdtemp(prefix="hjserve-byom-"))
    print(json.dumps(main(repository), indent=2))
