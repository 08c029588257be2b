// The Python module `masklm_kernels._C`. Importing it runs the TORCH_LIBRARY registrations of the
// other translation units; it exposes no Python functions of its own (ops are reached via torch.ops).
#include <Python.h>

static struct PyModuleDef mlk_module = {PyModuleDef_HEAD_INIT, "_C", "masklm_kernels C++/CUDA ops", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mlk_module); }
