/* The one file that includes Python.h: argument parsing, GIL release, error
 * mapping. All mechanism lives in plain C files next to this one. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "version.h"

PyDoc_STRVAR(module_doc,
"cuju-libvirt data plane (C extension).\n\n"
"Mechanism only: dirty tracking, page copy and encoding, framed transfer over\n"
"the FT link, staging and atomic commit. Policy lives in cuju_libvirt.ft_engine.");

static int
cuju_exec(PyObject *m)
{
    PyObject *features = NULL;

    if (PyModule_AddStringConstant(m, "__version__", CUJU_EXT_VERSION) < 0)
        goto error;
    if (PyModule_AddIntConstant(m, "WIRE_VERSION", CUJU_WIRE_VERSION) < 0)
        goto error;
    /* Every capability compiled in is named here; Python checks names, not versions. */
    features = PyFrozenSet_New(NULL);
    if (features == NULL)
        goto error;
    if (PyModule_AddObjectRef(m, "features", features) < 0)
        goto error;
    Py_DECREF(features);
    return 0;

error:
    Py_XDECREF(features);
    return -1;
}

static PyModuleDef_Slot cuju_slots[] = {
    {Py_mod_exec, cuju_exec},
    {0, NULL},
};

static PyMethodDef cuju_methods[] = {
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef cuju_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "cuju_libvirt._cuju",
    .m_doc = module_doc,
    .m_size = 0,
    .m_methods = cuju_methods,
    .m_slots = cuju_slots,
};

PyMODINIT_FUNC
PyInit__cuju(void)
{
    return PyModuleDef_Init(&cuju_module);
}
