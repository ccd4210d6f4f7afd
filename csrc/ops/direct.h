// The fused ops as plain functions of the Python module dla_fast._C (direct.cpp), added to it at import.
#pragma once

#include <Python.h>

namespace dla_fast {

// conv_bn_act, aggregate and max_pool, ending with a null entry (for PyModule_AddFunctions).
PyMethodDef* direct_methods();

}  // namespace dla_fast
