// The Python module `masklm_kernels._C`. Importing it runs the TORCH_LIBRARY_IMPL registrations of the
// other translation units: the CPU and CUDA kernels of ops whose schemas the Python package defines (ops
// are reached via torch.ops). Its only Python function reports build facts.
#include <Python.h>

#include "masking/philox_simd.h"

static PyObject* mlk_cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(mlk::philox_lanes_isa()); }

static PyMethodDef mlk_methods[] = {
    {"cpu_isa", mlk_cpu_isa, METH_NOARGS, "SIMD version of the CPU masking kernels: avx512, avx2 or scalar."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef mlk_module = {PyModuleDef_HEAD_INIT, "_C", "masklm_kernels C++/CUDA ops", -1, mlk_methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mlk_module); }
