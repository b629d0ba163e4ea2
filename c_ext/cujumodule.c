/* The one file that includes Python.h: argument parsing, GIL release, error
 * mapping. All mechanism lives in plain C files next to this one. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "version.h"

/* ======================================================================== */
/* BEGIN trackers block (helper `trackers`): dirty trackers uffd + scan.     */
/* Mechanism in uffd.c, attach.c, scan.c; policy in ft_engine/trackers.py.   */
/* ======================================================================== */
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>

#include "attach.h"
#include "scan.h"
#include "uffd.h"

typedef struct {
    PyObject_HEAD
    pthread_mutex_t op_lock; /* serialises arm/harvest/close across Python threads */
    struct uffd_tracker t;   /* owned by whoever holds op_lock */
    bool open;               /* under op_lock */
} UffdTrackerObject;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t op_lock;
    struct scan_tracker t;
    Py_buffer ram;           /* the caller's mapping, held while open */
    bool open;
} ScanTrackerObject;

static PyObject *
trk_oserror(int neg_errno, const char *what)
{
    errno = -neg_errno;
    return PyErr_Format(PyExc_OSError, "%s: [Errno %d] %s", what, -neg_errno, strerror(-neg_errno));
}

static const struct { uint64_t bit; const char *name; } trk_feature_names[] = {
    {UFFD_FEATURE_EVENT_REMAP, "EVENT_REMAP"},
    {UFFD_FEATURE_EVENT_REMOVE, "EVENT_REMOVE"},
    {UFFD_FEATURE_EVENT_UNMAP, "EVENT_UNMAP"},
    {UFFD_FEATURE_WP_HUGETLBFS_SHMEM, "WP_HUGETLBFS_SHMEM"},
    {UFFD_FEATURE_WP_UNPOPULATED, "WP_UNPOPULATED"},
    {UFFD_FEATURE_WP_ASYNC, "WP_ASYNC"},
};

static PyObject *
trk_feature_list(uint64_t mask)
{
    PyObject *l = PyList_New(0);
    if (l == NULL)
        return NULL;
    for (size_t i = 0; i < sizeof(trk_feature_names) / sizeof(trk_feature_names[0]); i++) {
        if (!(mask & trk_feature_names[i].bit))
            continue;
        PyObject *s = PyUnicode_FromString(trk_feature_names[i].name);
        if (s == NULL || PyList_Append(l, s) < 0) {
            Py_XDECREF(s);
            Py_DECREF(l);
            return NULL;
        }
        Py_DECREF(s);
    }
    return l;
}

/* --- UffdTracker ---------------------------------------------------------- */

static PyObject *
UffdTracker_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"uffd", "pid", "start", "length", "walkers", NULL};
    int fd, pid, own = -1, err, walkers = 1;
    unsigned long long start, length;
    uint64_t missing = 0;
    UffdTrackerObject *self = NULL;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiKK|i:UffdTracker", kwlist, &fd, &pid, &start, &length,
                                     &walkers))
        return NULL;
    self = (UffdTrackerObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    pthread_mutex_init(&self->op_lock, NULL);
    own = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (own < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto error;
    }
    Py_BEGIN_ALLOW_THREADS
    err = uffd_tracker_open(&self->t, own, pid, start, length, walkers, &missing);
    Py_END_ALLOW_THREADS
    if (err < 0) {
        if (err == -EPROTONOSUPPORT) {
            PyObject *names = trk_feature_list(missing);
            if (names != NULL) {
                PyErr_Format(PyExc_OSError, "userfaultfd lacks features %R", names);
                Py_DECREF(names);
            }
        } else {
            trk_oserror(err, "opening the uffd tracker");
        }
        goto error;
    }
    self->open = true;
    return (PyObject *)self;

error:
    Py_XDECREF(self);
    return NULL;
}

static void
UffdTracker_dealloc(UffdTrackerObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    if (self->open) {
        Py_BEGIN_ALLOW_THREADS
        uffd_tracker_close(&self->t);
        Py_END_ALLOW_THREADS
        self->open = false;
    }
    pthread_mutex_destroy(&self->op_lock);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *
UffdTracker_arm(UffdTrackerObject *self, PyObject *Py_UNUSED(ignored))
{
    int err = -EBADF;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->op_lock);
    if (self->open)
        err = uffd_tracker_arm(&self->t);
    pthread_mutex_unlock(&self->op_lock);
    Py_END_ALLOW_THREADS
    if (err < 0)
        return trk_oserror(err, "arming the uffd tracker (UFFDIO_REGISTER/WRITEPROTECT)");
    Py_RETURN_NONE;
}

static PyObject *
UffdTracker_harvest(UffdTrackerObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"out", NULL};
    Py_buffer out;
    int64_t n = -EBADF;
    bool resync = true;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "w*:harvest", kwlist, &out))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->op_lock);
    if (self->open)
        n = uffd_tracker_harvest(&self->t, out.buf, (uint64_t)out.len / sizeof(uint64_t), &resync);
    pthread_mutex_unlock(&self->op_lock);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&out);
    if (n < 0)
        return trk_oserror((int)n, "harvesting the uffd tracker (PAGEMAP_SCAN)");
    return Py_BuildValue("(LO)", (long long)n, resync ? Py_True : Py_False);
}

static PyObject *
UffdTracker_close(UffdTrackerObject *self, PyObject *Py_UNUSED(ignored))
{
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->op_lock);
    if (self->open)
        uffd_tracker_close(&self->t);
    self->open = false;
    pthread_mutex_unlock(&self->op_lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *
UffdTracker_stats(UffdTrackerObject *self, PyObject *Py_UNUSED(ignored))
{
    unsigned long long rem = 0, other = 0;
    int terr = 0;
    PyObject *features;
    if (self->open) {
        pthread_mutex_lock(&self->t.lock);
        rem = self->t.events_remove;
        other = self->t.events_other;
        terr = self->t.thread_errno;
        pthread_mutex_unlock(&self->t.lock);
    }
    features = trk_feature_list(self->open ? self->t.features : 0);
    if (features == NULL)
        return NULL;
    return Py_BuildValue("{sKsKsisN}", "events_remove", rem, "events_other", other,
                         "event_thread_errno", terr, "features", features);
}

static PyObject *
UffdTracker_get_page_size(UffdTrackerObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->t.page_size);
}

static PyObject *
UffdTracker_get_npages(UffdTrackerObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->t.page_size ? self->t.length / self->t.page_size : 0);
}

static PyObject *
UffdTracker_get_closed(UffdTrackerObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(!self->open);
}

static PyMethodDef UffdTracker_methods[] = {
    {"arm", (PyCFunction)UffdTracker_arm, METH_NOARGS,
     "Register the range for write-protect and protect all of it."},
    {"harvest", (PyCFunction)(void (*)(void))UffdTracker_harvest, METH_VARARGS | METH_KEYWORDS,
     "harvest(out) -> (count, resync): written/removed page indexes into the uint64 buffer out."},
    {"close", (PyCFunction)UffdTracker_close, METH_NOARGS, "Stop the event thread and close the uffd."},
    {"stats", (PyCFunction)UffdTracker_stats, METH_NOARGS, "Event counters and negotiated features."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef UffdTracker_getset[] = {
    {"page_size", (getter)UffdTracker_get_page_size, NULL, "bytes per page", NULL},
    {"npages", (getter)UffdTracker_get_npages, NULL, "pages in the region", NULL},
    {"closed", (getter)UffdTracker_get_closed, NULL, "True after close()", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot UffdTracker_slots[] = {
    {Py_tp_new, UffdTracker_new},
    {Py_tp_dealloc, UffdTracker_dealloc},
    {Py_tp_methods, UffdTracker_methods},
    {Py_tp_getset, UffdTracker_getset},
    {Py_tp_doc, "UffdTracker(uffd, pid, start, length, walkers=1): userfaultfd WP-async + PAGEMAP_SCAN\n"
                "tracker; harvests split the page-table walk over `walkers` threads.\n"
                "uffd is duplicated (the caller keeps and closes its own fd)."},
    {0, NULL},
};

static PyType_Spec UffdTracker_spec = {
    .name = "cuju_libvirt._cuju.UffdTracker",
    .basicsize = sizeof(UffdTrackerObject),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = UffdTracker_slots,
};

/* --- ScanTracker ---------------------------------------------------------- */

static PyObject *
ScanTracker_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"ram", "nthreads", NULL};
    PyObject *ram;
    int nthreads = 2, err;
    ScanTrackerObject *self = (ScanTrackerObject *)NULL;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|i:ScanTracker", kwlist, &ram, &nthreads))
        return NULL;
    self = (ScanTrackerObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    pthread_mutex_init(&self->op_lock, NULL);
    if (PyObject_GetBuffer(ram, &self->ram, PyBUF_SIMPLE) < 0)
        goto error;
    err = scan_tracker_open(&self->t, self->ram.buf, (uint64_t)self->ram.len, nthreads);
    if (err < 0) {
        PyBuffer_Release(&self->ram);
        trk_oserror(err, "opening the scan tracker (length must be a multiple of the page size)");
        goto error;
    }
    self->open = true;
    return (PyObject *)self;

error:
    Py_DECREF(self);
    return NULL;
}

static void
ScanTracker_dealloc(ScanTrackerObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    if (self->open) {
        scan_tracker_close(&self->t);
        PyBuffer_Release(&self->ram);
        self->open = false;
    }
    pthread_mutex_destroy(&self->op_lock);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *
ScanTracker_arm(ScanTrackerObject *self, PyObject *Py_UNUSED(ignored))
{
    int err = -EBADF;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->op_lock);
    if (self->open)
        err = scan_tracker_arm(&self->t);
    pthread_mutex_unlock(&self->op_lock);
    Py_END_ALLOW_THREADS
    if (err < 0)
        return trk_oserror(err, "arming the scan tracker");
    Py_RETURN_NONE;
}

static PyObject *
ScanTracker_harvest(ScanTrackerObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"out", NULL};
    Py_buffer out;
    int64_t n = -EBADF;
    bool resync = true;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "w*:harvest", kwlist, &out))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->op_lock);
    if (self->open)
        n = scan_tracker_harvest(&self->t, out.buf, (uint64_t)out.len / sizeof(uint64_t), &resync);
    pthread_mutex_unlock(&self->op_lock);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&out);
    if (n < 0)
        return trk_oserror((int)n, "harvesting the scan tracker");
    return Py_BuildValue("(LO)", (long long)n, resync ? Py_True : Py_False);
}

static PyObject *
ScanTracker_close(ScanTrackerObject *self, PyObject *Py_UNUSED(ignored))
{
    bool was_open;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->op_lock);
    was_open = self->open;
    if (self->open)
        scan_tracker_close(&self->t);
    self->open = false;
    pthread_mutex_unlock(&self->op_lock);
    Py_END_ALLOW_THREADS
    if (was_open)
        PyBuffer_Release(&self->ram);
    Py_RETURN_NONE;
}

static PyObject *
ScanTracker_get_page_size(ScanTrackerObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->t.page_size);
}

static PyObject *
ScanTracker_get_npages(ScanTrackerObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->t.page_size ? self->t.length / self->t.page_size : 0);
}

static PyObject *
ScanTracker_get_closed(ScanTrackerObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(!self->open);
}

static PyMethodDef ScanTracker_methods[] = {
    {"arm", (PyCFunction)ScanTracker_arm, METH_NOARGS, "Copy the whole region into the shadow."},
    {"harvest", (PyCFunction)(void (*)(void))ScanTracker_harvest, METH_VARARGS | METH_KEYWORDS,
     "harvest(out) -> (count, resync): changed page indexes into the uint64 buffer out."},
    {"close", (PyCFunction)ScanTracker_close, METH_NOARGS, "Free the shadow, release the mapping."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef ScanTracker_getset[] = {
    {"page_size", (getter)ScanTracker_get_page_size, NULL, "bytes per page", NULL},
    {"npages", (getter)ScanTracker_get_npages, NULL, "pages in the region", NULL},
    {"closed", (getter)ScanTracker_get_closed, NULL, "True after close()", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot ScanTracker_slots[] = {
    {Py_tp_new, ScanTracker_new},
    {Py_tp_dealloc, ScanTracker_dealloc},
    {Py_tp_methods, ScanTracker_methods},
    {Py_tp_getset, ScanTracker_getset},
    {Py_tp_doc, "ScanTracker(ram, nthreads=2): shadow-compare tracker over a readable buffer."},
    {0, NULL},
};

static PyType_Spec ScanTracker_spec = {
    .name = "cuju_libvirt._cuju.ScanTracker",
    .basicsize = sizeof(ScanTrackerObject),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = ScanTracker_slots,
};

/* --- module functions ------------------------------------------------------ */

static PyObject *
trk_uffd_probe(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"user_mode_only", NULL};
    int umo = 1, err;
    struct uffd_caps caps;
    PyObject *offered, *missing;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|p:uffd_probe", kwlist, &umo))
        return NULL;
    err = uffd_probe(&caps, umo);
    if (err < 0)
        return trk_oserror(err, "probing userfaultfd/PAGEMAP_SCAN");
    offered = trk_feature_list(caps.features);
    missing = trk_feature_list(CUJU_UFFD_REQUIRED & ~caps.features);
    if (offered == NULL || missing == NULL) {
        Py_XDECREF(offered);
        Py_XDECREF(missing);
        return NULL;
    }
    return Py_BuildValue("{sNsNsOsi}", "features", offered, "missing", missing, "pagemap_scan",
                         caps.pagemap_scan ? Py_True : Py_False, "uffd_errno", caps.uffd_errno);
}

static PyObject *
trk_uffd_create(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"user_mode_only", NULL};
    int umo = 1, fd;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|p:uffd_create", kwlist, &umo))
        return NULL;
    fd = uffd_create(umo);
    if (fd < 0)
        return trk_oserror(fd, "userfaultfd()");
    return PyLong_FromLong(fd);
}

static PyObject *
trk_uffd_attach(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"pid", "tid", "user_mode_only", NULL};
    int pid, tid, umo = 1, fd;
    enum uffd_attach_stage stage = ATTACH_OK;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "ii|p:uffd_attach", kwlist, &pid, &tid, &umo))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    fd = uffd_attach(pid, tid, umo, &stage);
    Py_END_ALLOW_THREADS
    if (fd < 0) {
        PyObject *exc_args = Py_BuildValue("(iss)", -fd, strerror(-fd), uffd_attach_stage_name(stage));
        if (exc_args != NULL) {
            PyErr_SetObject(PyExc_OSError, exc_args);
            Py_DECREF(exc_args);
        }
        return NULL;
    }
    return PyLong_FromLong(fd);
}

#define TRACKERS_METHODS \
    {"uffd_probe", (PyCFunction)(void (*)(void))trk_uffd_probe, METH_VARARGS | METH_KEYWORDS, \
     "uffd_probe(user_mode_only=True) -> dict: what userfaultfd/PAGEMAP_SCAN offer here."}, \
    {"uffd_create", (PyCFunction)(void (*)(void))trk_uffd_create, METH_VARARGS | METH_KEYWORDS, \
     "uffd_create(user_mode_only=True) -> fd: a userfaultfd of this process."}, \
    {"uffd_attach", (PyCFunction)(void (*)(void))trk_uffd_attach, METH_VARARGS | METH_KEYWORDS, \
     "uffd_attach(pid, tid, user_mode_only=True) -> fd: a userfaultfd of process pid, made by\n" \
     "ptrace-injecting userfaultfd() into its thread tid. OSError(errno, strerror, stage)."},

static int
trackers_exec(PyObject *m, PyObject *features)
{
    PyObject *t;
    t = PyType_FromModuleAndSpec(m, &UffdTracker_spec, NULL);
    if (t == NULL || PyModule_AddObjectRef(m, "UffdTracker", t) < 0) {
        Py_XDECREF(t);
        return -1;
    }
    Py_DECREF(t);
    t = PyType_FromModuleAndSpec(m, &ScanTracker_spec, NULL);
    if (t == NULL || PyModule_AddObjectRef(m, "ScanTracker", t) < 0) {
        Py_XDECREF(t);
        return -1;
    }
    Py_DECREF(t);
    const char *names[] = {"tracker.scan", "tracker.uffd"
#if defined(__x86_64__)
                           , "tracker.uffd.attach"
#endif
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        PyObject *s = PyUnicode_FromString(names[i]);
        if (s == NULL || PySet_Add(features, s) < 0) {
            Py_XDECREF(s);
            return -1;
        }
        Py_DECREF(s);
    }
    return 0;
}
/* ======================================================================== */
/* END trackers block                                                       */
/* ======================================================================== */

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
    if (trackers_exec(m, features) < 0)
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
    TRACKERS_METHODS
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
