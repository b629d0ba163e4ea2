/* The one file that includes Python.h: argument parsing, GIL release, error
 * mapping. All mechanism lives in plain C files next to this one. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "version.h"

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <unistd.h>

#include "aead.h"
#include "checksum.h"
#include "diskjournal.h"
#include "replicator.h"

/* --- helpers both blocks below use ----------------------------------------- */

/* Create the heap type of `spec` and add it to the module as `name`. */
static int
cuju_add_type(PyObject *m, PyType_Spec *spec, const char *name)
{
    PyObject *t = PyType_FromModuleAndSpec(m, spec, NULL);
    if (t == NULL)
        return -1;
    int rc = PyModule_AddObjectRef(m, name, t);
    Py_DECREF(t);
    return rc;
}

/* Name one compiled-in capability in the module's `features` set. */
static int
cuju_add_feature(PyObject *features, const char *name)
{
    PyObject *s = PyUnicode_FromString(name);
    if (s == NULL)
        return -1;
    int rc = PySet_Add(features, s);
    Py_DECREF(s);
    return rc;
}
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

/* UffdTracker and ScanTracker bind the same steps: each runs one tracker call
 * under op_lock with the GIL released, and a closed tracker answers -EBADF.
 * The adapters below give uffd_tracker_* and scan_tracker_* one signature. */
typedef int (*trk_arm_fn)(void *t);
typedef int64_t (*trk_harvest_fn)(void *t, uint64_t *out, uint64_t cap, bool *resync);

static PyObject *
trk_arm(pthread_mutex_t *op_lock, const bool *open, trk_arm_fn arm, void *t, const char *what)
{
    int err = -EBADF;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(op_lock);
    if (*open)
        err = arm(t);
    pthread_mutex_unlock(op_lock);
    Py_END_ALLOW_THREADS
    if (err < 0)
        return trk_oserror(err, what);
    Py_RETURN_NONE;
}

/* harvest(out) -> (count, resync): page indexes into the uint64 buffer out. */
static PyObject *
trk_harvest(pthread_mutex_t *op_lock, const bool *open, trk_harvest_fn harvest, void *t, PyObject *args,
            PyObject *kwds, const char *what)
{
    static char *kwlist[] = {"out", NULL};
    Py_buffer out;
    int64_t n = -EBADF;
    bool resync = true;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "w*:harvest", kwlist, &out))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(op_lock);
    if (*open)
        n = harvest(t, out.buf, (uint64_t)out.len / sizeof(uint64_t), &resync);
    pthread_mutex_unlock(op_lock);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&out);
    if (n < 0)
        return trk_oserror((int)n, what);
    return Py_BuildValue("(LO)", (long long)n, resync ? Py_True : Py_False);
}

static PyObject *
trk_npages(uint64_t page_size, uint64_t length)
{
    return PyLong_FromUnsignedLongLong(page_size ? length / page_size : 0);
}

static int trk_uffd_arm(void *t) { return uffd_tracker_arm(t); }
static int trk_scan_arm(void *t) { return scan_tracker_arm(t); }

static int64_t
trk_uffd_harvest(void *t, uint64_t *out, uint64_t cap, bool *resync)
{
    return uffd_tracker_harvest(t, out, cap, resync);
}

static int64_t
trk_scan_harvest(void *t, uint64_t *out, uint64_t cap, bool *resync)
{
    return scan_tracker_harvest(t, out, cap, resync);
}

/* --- UffdTracker ---------------------------------------------------------- */

static PyObject *
UffdTracker_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"uffd", "pid", "start", "length", "walkers", "sync", NULL};
    int fd, pid, own = -1, err, walkers = 1, sync = 0;
    unsigned long long start, length;
    uint64_t missing = 0;
    UffdTrackerObject *self = NULL;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiKK|ip:UffdTracker", kwlist, &fd, &pid, &start, &length,
                                     &walkers, &sync))
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
    err = uffd_tracker_open(&self->t, own, pid, start, length, walkers,
                            sync ? UFFD_MODE_SYNC : UFFD_MODE_ASYNC, &missing);
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
    return trk_arm(&self->op_lock, &self->open, trk_uffd_arm, &self->t,
                   "arming the uffd tracker (UFFDIO_REGISTER/WRITEPROTECT)");
}

static PyObject *
UffdTracker_harvest(UffdTrackerObject *self, PyObject *args, PyObject *kwds)
{
    return trk_harvest(&self->op_lock, &self->open, trk_uffd_harvest, &self->t, args, kwds,
                       "harvesting the uffd tracker (PAGEMAP_SCAN)");
}

static PyObject *
UffdTracker_settle(UffdTrackerObject *self, PyObject *Py_UNUSED(ignored))
{
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->op_lock);
    if (self->open)
        uffd_tracker_settle(&self->t);
    pthread_mutex_unlock(&self->op_lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
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
    unsigned long long rem = 0, other = 0, faults = 0, reprotected = 0, hot = 0;
    int terr = 0;
    PyObject *features;
    if (self->open) {
        pthread_mutex_lock(&self->t.lock);
        rem = self->t.events_remove;
        other = self->t.events_other;
        terr = self->t.thread_errno;
        faults = self->t.faults;
        reprotected = self->t.reprotected;
        hot = self->t.hot;
        pthread_mutex_unlock(&self->t.lock);
    }
    features = trk_feature_list(self->open ? self->t.features : 0);
    if (features == NULL)
        return NULL;
    return Py_BuildValue("{sKsKsisNsssKsKsK}", "events_remove", rem, "events_other", other,
                         "event_thread_errno", terr, "features", features,
                         "mode", self->t.mode == UFFD_MODE_SYNC ? "sync" : "async", "faults", faults,
                         "reprotected", reprotected, "hot_pages", hot);
}

static PyObject *
UffdTracker_get_page_size(UffdTrackerObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->t.page_size);
}

static PyObject *
UffdTracker_get_npages(UffdTrackerObject *self, void *Py_UNUSED(c))
{
    return trk_npages(self->t.page_size, self->t.length);
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
    {"settle", (PyCFunction)UffdTracker_settle, METH_NOARGS,
     "Sync mode, VM stopped after a harvest: pages protected again since need not be reported next."},
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
    {Py_tp_doc, "UffdTracker(uffd, pid, start, length, walkers=1, sync=False): userfaultfd write-protect\n"
                "tracker. Async (default): WP_ASYNC + PAGEMAP_SCAN, harvests split the page-table walk over\n"
                "`walkers` threads. sync=True: write faults are resolved by the event thread and recorded,\n"
                "harvests read bitmaps (no page-table walk); the uffd must not be UFFD_USER_MODE_ONLY.\n"
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
    return trk_arm(&self->op_lock, &self->open, trk_scan_arm, &self->t,
                   "arming the scan tracker");
}

static PyObject *
ScanTracker_harvest(ScanTrackerObject *self, PyObject *args, PyObject *kwds)
{
    return trk_harvest(&self->op_lock, &self->open, trk_scan_harvest, &self->t, args, kwds,
                       "harvesting the scan tracker");
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
    return trk_npages(self->t.page_size, self->t.length);
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
    if (cuju_add_type(m, &UffdTracker_spec, "UffdTracker") < 0 ||
        cuju_add_type(m, &ScanTracker_spec, "ScanTracker") < 0)
        return -1;
    const char *names[] = {"tracker.scan", "tracker.uffd"
#if defined(__x86_64__)
                           , "tracker.uffd.attach"
#endif
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (cuju_add_feature(features, names[i]) < 0)
            return -1;
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

/* ======================================================================
 * BEGIN replicate block (helper `dataplane`): epoch sender/receiver of
 * wire.h, bound as _cuju.Sender / _cuju.Receiver. Mechanism in sender.c,
 * receiver.c, netio.c, checksum.c.
 * ====================================================================== */
/* Errors: a CUJU_E_* code becomes an exception from cuju_libvirt.errors,
 * looked up when raised (error path only), carrying code/peer_code/os_errno. */
static const char *
repl_exc_name(int code)
{
    switch (code) {
    case CUJU_E_IO: case CUJU_E_EOF: case CUJU_E_CLOSED:
        return "LinkError";
    case CUJU_E_TIMEOUT:
        return "LinkTimeout";
    case CUJU_E_MAGIC: case CUJU_E_VERSION: case CUJU_E_GEOMETRY: case CUJU_E_FRAME:
    case CUJU_E_INDEX: case CUJU_E_SEQUENCE:
        return "ProtocolError";
    case CUJU_E_CHECKSUM:
        return "ChecksumError";
    case CUJU_E_AUTH:
        return "LinkAuthError";
    case CUJU_E_PEER:
        return "PeerAbortError";
    case CUJU_E_APPLY:
        return "ApplyError";
    case CUJU_E_JOURNAL:
        return "JournalError";
    default:
        return "ReplicationError";
    }
}

static void
repl_raise(int code, int os_errno, int peer_code, const char *detail)
{
    PyObject *mod = NULL, *cls = NULL, *args = NULL, *kw = NULL, *exc = NULL;

    if (code == CUJU_E_NOMEM) {
        PyErr_NoMemory();
        return;
    }
    mod = PyImport_ImportModule("cuju_libvirt.errors");
    if (mod == NULL)
        goto error;
    cls = PyObject_GetAttrString(mod, repl_exc_name(code));
    if (cls == NULL)
        goto error;
    if (detail != NULL && detail[0] != '\0')
        args = Py_BuildValue("(s)", detail);
    else
        args = Py_BuildValue("(s)", cuju_strerror(code));
    kw = Py_BuildValue("{s:i,s:i,s:i}", "code", code, "peer_code", peer_code, "os_errno", os_errno);
    if (args == NULL || kw == NULL)
        goto error;
    exc = PyObject_Call(cls, args, kw);
    if (exc == NULL)
        goto error;
    PyErr_SetObject(cls, exc);
error:
    Py_XDECREF(exc);
    Py_XDECREF(kw);
    Py_XDECREF(args);
    Py_XDECREF(cls);
    Py_XDECREF(mod);
}

/* None -> -1 (forever); seconds -> milliseconds, rounded up. */
static int
repl_timeout_ms(PyObject *obj, int *ms)
{
    if (obj == NULL || obj == Py_None) {
        *ms = -1;
        return 0;
    }
    double t = PyFloat_AsDouble(obj);
    if (t == -1.0 && PyErr_Occurred())
        return -1;
    if (!(t >= 0.0) || t > 86400.0 * 365) {
        PyErr_SetString(PyExc_ValueError, "timeout must be None or between 0 and one year (seconds)");
        return -1;
    }
    *ms = (int)(t * 1000.0 + 0.999);
    return 0;
}

static int
repl_dup_fd(int fd)
{
    int d = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (d < 0)
        PyErr_SetFromErrno(PyExc_OSError);
    return d;
}

static int
repl_put_u64(PyObject *d, const char *key, uint64_t v)
{
    PyObject *o = PyLong_FromUnsignedLongLong(v);
    if (o == NULL)
        return -1;
    int rc = PyDict_SetItemString(d, key, o);
    Py_DECREF(o);
    return rc;
}

/* counters(): one uint64_t field of a stats struct per dict key, in table order. */
struct repl_counter {
    const char *name;
    size_t offset;
};
#define REPL_COUNTER(type, field) {#field, offsetof(type, field)}

static PyObject *
repl_counters(const void *stats, const struct repl_counter *fields, size_t n)
{
    PyObject *d = PyDict_New();
    if (d == NULL)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        uint64_t v;
        memcpy(&v, (const char *)stats + fields[i].offset, sizeof(v));
        if (repl_put_u64(d, fields[i].name, v) < 0)
            goto error;
    }
    return d;

error:
    Py_DECREF(d);
    return NULL;
}

/* Raise `code` with the message the sender/receiver recorded for it, if the
 * first failure it recorded is that code; else with `fallback`. */
static void
repl_raise_recorded(int code, int first, int eno, int peer, const char *msg, const char *fallback)
{
    repl_raise(code, eno, peer, first == code && msg[0] ? msg : fallback);
}

static int
repl_check_region(const Py_buffer *region, unsigned int page_size)
{
    if (region->len <= 0 || page_size == 0 || (uint64_t)region->len % page_size) {
        PyErr_Format(PyExc_ValueError, "region of %zd bytes is not a whole number of %u-byte pages", region->len,
                     page_size);
        return -1;
    }
    return 0;
}

/* Link keys: None (cleartext) or exactly LINK_KEYS_LEN bytes (aead.h). */
static int
repl_check_keys(Py_buffer *keys)
{
    if (keys->buf != NULL && keys->len != CUJU_LINK_KEYS_LEN) {
        PyErr_Format(PyExc_ValueError, "link_keys must be %d bytes (tx key, tx iv, rx key, rx iv), got %zd",
                     CUJU_LINK_KEYS_LEN, keys->len);
        return -1;
    }
    return 0;
}

/* A sequence of disk sizes (bytes) -> at most CUJU_DJ_MAX_DISKS u64s. */
static int
repl_disk_sizes(PyObject *obj, uint64_t *sizes, unsigned *n)
{
    *n = 0;
    if (obj == NULL || obj == Py_None)
        return 0;
    PyObject *seq = PySequence_Fast(obj, "disk_sizes must be a sequence of sizes in bytes");
    if (seq == NULL)
        return -1;
    Py_ssize_t len = PySequence_Fast_GET_SIZE(seq);
    if (len > (Py_ssize_t)CUJU_DJ_MAX_DISKS) {
        PyErr_Format(PyExc_ValueError, "%zd disks: at most %u can be replicated", len, CUJU_DJ_MAX_DISKS);
        goto error;
    }
    for (Py_ssize_t i = 0; i < len; i++) {
        unsigned long long v = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (v == (unsigned long long)-1 && PyErr_Occurred())
            goto error;
        if (v == 0 || v % 512) {
            PyErr_Format(PyExc_ValueError, "disk %zd: size %llu must be a positive multiple of 512", i, v);
            goto error;
        }
        sizes[i] = v;
    }
    *n = (unsigned)len;
    Py_DECREF(seq);
    return 0;

error:
    Py_DECREF(seq);
    return -1;
}

/* ---- Sender ---- */

typedef struct {
    PyObject_HEAD
    struct cuju_sender *s;      /* GIL: NULL once deallocated */
    Py_buffer region;           /* GIL: held for the object's lifetime */
    int busy_close;             /* GIL: close() in progress or done */
    /* GIL: the borrowed disk parts of the epoch in each staging buffer, held
     * until the next stage into that buffer or close (the send thread reads
     * them in place). */
    Py_buffer held[2][CUJU_DJ_MAX_DISKS];
    Py_ssize_t nheld[2];
} SenderObject;

static void
sender_release_held(SenderObject *self, int slot)
{
    for (Py_ssize_t i = 0; i < self->nheld[slot]; i++)
        PyBuffer_Release(&self->held[slot][i]);
    self->nheld[slot] = 0;
}

static void
sender_raise(SenderObject *self, int code, const char *fallback)
{
    char msg[CUJU_ERRMSG_LEN];
    int eno = 0, peer = 0;
    int first = cuju_sender_error(self->s, &eno, &peer, msg, sizeof(msg));
    repl_raise_recorded(code, first, eno, peer, msg, fallback);
}

static int
Sender_init(SenderObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "region", "page_size", "session_id", "io_timeout", "disk_sizes", "link_keys",
                             NULL};
    int fd, dfd = -1, ms, rc;
    unsigned int page_size = 4096;
    unsigned long long session_id = 0;
    PyObject *io_timeout = Py_None, *disk_sizes = NULL;
    Py_buffer region = {0}, keys = {0};
    uint64_t sizes[CUJU_DJ_MAX_DISKS];
    unsigned ndisks = 0;

    if (self->s != NULL) {
        PyErr_SetString(PyExc_TypeError, "Sender is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iy*|$IKOOz*:Sender", kwlist, &fd, &region, &page_size,
                                     &session_id, &io_timeout, &disk_sizes, &keys))
        return -1;
    if (repl_check_keys(&keys) < 0)
        goto error;
    if (repl_timeout_ms(io_timeout, &ms) < 0)
        goto error;
    if (repl_disk_sizes(disk_sizes, sizes, &ndisks) < 0)
        goto error;
    if (repl_check_region(&region, page_size) < 0)
        goto error;
    dfd = repl_dup_fd(fd);
    if (dfd < 0)
        goto error;
    rc = cuju_sender_new(dfd, region.buf, (uint64_t)region.len, page_size, session_id,
                         cuju_disk_geometry(ndisks, sizes), ms, &self->s);
    if (rc != CUJU_OK) {
        if (rc == CUJU_E_ARG)
            PyErr_Format(PyExc_ValueError, "page_size %u / region size %zd not supported "
                         "(page size a power of two in 4096..2 MiB)", page_size, region.len);
        else
            repl_raise(rc, 0, 0, NULL);
        goto error;
    }
    if (keys.buf != NULL && cuju_sender_set_keys(self->s, keys.buf) != CUJU_OK) {
        PyErr_NoMemory();
        cuju_sender_free(self->s);  /* closes dfd */
        self->s = NULL;
        dfd = -1;
        goto error;
    }
    self->region = region;
    if (keys.obj)
        PyBuffer_Release(&keys);
    return 0;

error:
    if (dfd >= 0)
        close(dfd);
    PyBuffer_Release(&region);
    if (keys.obj)
        PyBuffer_Release(&keys);
    return -1;
}

static int
sender_ready(SenderObject *self)
{
    if (self->s == NULL || self->busy_close) {
        repl_raise(CUJU_E_CLOSED, 0, 0, "the sender is closed");
        return 0;
    }
    return 1;
}

static PyObject *
Sender_handshake(SenderObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"timeout", NULL};
    PyObject *timeout = Py_None;
    int ms, rc;
    uint64_t last = 0;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O:handshake", kwlist, &timeout))
        return NULL;
    if (repl_timeout_ms(timeout, &ms) < 0 || !sender_ready(self))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = cuju_sender_handshake(self->s, ms, &last);
    Py_END_ALLOW_THREADS
    if (rc != CUJU_OK) {
        sender_raise(self, rc, "handshake failed");
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(last);
}

/* Page indexes: a C-contiguous buffer of 8-byte unsigned integers (array('Q'),
 * a numpy uint64 array, or raw bytes holding native u64s). */
static int
repl_get_indexes(PyObject *obj, Py_buffer *view)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    const char *fmt = view->format ? view->format : "B";
    char last = fmt[strlen(fmt) - 1];
    int ok = (view->itemsize == 8 && (last == 'Q' || last == 'L') && (fmt[0] == '@' || fmt[0] == '=' ||
              fmt[0] == '<' || fmt[0] == last)) ||
             (view->itemsize == 1 && (last == 'B' || last == 'b' || last == 'c') && view->len % 8 == 0);
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "dirty_indexes must be a buffer of unsigned 64-bit integers "
                     "(e.g. array('Q')), not format '%s'", fmt);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *
Sender_stage(SenderObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"epoch", "dirty_indexes", "device_state", "timeout", "disks", NULL};
    unsigned long long epoch;
    PyObject *idx_obj, *timeout = Py_None, *disks = NULL, *dseq = NULL;
    Py_buffer idx = {0}, dev = {0};
    Py_buffer dbuf[CUJU_DJ_MAX_DISKS];
    struct cuju_disk_part parts[CUJU_DJ_MAX_DISKS];
    Py_ssize_t nparts = 0;
    int ms, rc;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "KOy*|OO:stage", kwlist, &epoch, &idx_obj, &dev, &timeout,
                                     &disks))
        return NULL;
    if (repl_timeout_ms(timeout, &ms) < 0 || !sender_ready(self))
        goto error;
    if (repl_get_indexes(idx_obj, &idx) < 0)
        goto error;
    if (disks != NULL && disks != Py_None) {
        dseq = PySequence_Fast(disks, "disks must be a sequence of (disk index, records buffer)");
        if (dseq == NULL)
            goto error;
        if (PySequence_Fast_GET_SIZE(dseq) > (Py_ssize_t)CUJU_DJ_MAX_DISKS) {
            PyErr_Format(PyExc_ValueError, "at most %u disk parts per epoch", CUJU_DJ_MAX_DISKS);
            goto error;
        }
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(dseq); i++) {
            unsigned int d;
            int borrowed = 0;
            if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(dseq, i), "Iy*|p:disks", &d, &dbuf[nparts], &borrowed))
                goto error;
            parts[nparts].disk = d;
            parts[nparts].borrowed = (uint32_t)borrowed;
            parts[nparts].records = dbuf[nparts].buf;
            parts[nparts].len = (uint64_t)dbuf[nparts].len;
            nparts++;
        }
    }
    int slot = 0;
    Py_BEGIN_ALLOW_THREADS
    rc = cuju_sender_stage(self->s, epoch, idx.buf, (size_t)idx.len / 8, dev.buf, (size_t)dev.len, parts,
                           (size_t)nparts, ms, &slot);
    Py_END_ALLOW_THREADS
    switch (rc) {
    case CUJU_OK:
        break;
    case CUJU_E_INDEX:
        PyErr_SetString(PyExc_ValueError, "a dirty page index lies outside the region; nothing was staged");
        goto error;
    case CUJU_E_ARG:
        PyErr_Format(PyExc_ValueError, "too many pages, device state over %llu bytes, disk records not a "
                     "multiple of 8 bytes, over %llu bytes or for an unknown disk, or no handshake yet",
                     (unsigned long long)CUJU_WIRE_MAX_DEVSTATE, (unsigned long long)CUJU_WIRE_MAX_DISK);
        goto error;
    case CUJU_E_SEQUENCE:
        PyErr_Format(PyExc_ValueError, "epoch %llu out of sequence: epochs run consecutively from above the "
                     "backup's last applied one, and each stage() needs a ship()", epoch);
        goto error;
    default:
        sender_raise(self, rc, "staging failed");
        goto error;
    }
    /* This buffer was free: the send thread is done with its earlier epoch's
     * borrowed parts. Keep this epoch's until the buffer is staged again. */
    sender_release_held(self, slot);
    for (Py_ssize_t i = 0; i < nparts; i++) {
        if (parts[i].borrowed)
            self->held[slot][self->nheld[slot]++] = dbuf[i];
        else
            PyBuffer_Release(&dbuf[i]);
    }
    Py_XDECREF(dseq);
    PyBuffer_Release(&idx);
    PyBuffer_Release(&dev);
    Py_RETURN_NONE;

error:
    for (Py_ssize_t i = 0; i < nparts; i++)
        PyBuffer_Release(&dbuf[i]);
    Py_XDECREF(dseq);
    if (idx.obj)
        PyBuffer_Release(&idx);
    PyBuffer_Release(&dev);
    return NULL;
}

static PyObject *
Sender_ship(SenderObject *self, PyObject *Py_UNUSED(ignored))
{
    int rc;
    if (!sender_ready(self))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = cuju_sender_ship(self->s);
    Py_END_ALLOW_THREADS
    if (rc == CUJU_E_SEQUENCE) {
        PyErr_SetString(PyExc_ValueError, "ship() without a staged epoch");
        return NULL;
    }
    if (rc != CUJU_OK) {
        sender_raise(self, rc, "shipping failed");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
Sender_wait_ack(SenderObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"epoch", "timeout", NULL};
    unsigned long long epoch;
    PyObject *timeout = Py_None;
    int ms, rc;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "K|O:wait_ack", kwlist, &epoch, &timeout))
        return NULL;
    if (repl_timeout_ms(timeout, &ms) < 0 || self->s == NULL)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = cuju_sender_wait_ack(self->s, epoch, ms);
    Py_END_ALLOW_THREADS
    if (rc == CUJU_OK)
        Py_RETURN_TRUE;
    if (rc == CUJU_E_TIMEOUT)
        Py_RETURN_FALSE;
    sender_raise(self, rc, "the link to the backup is gone");
    return NULL;
}

#define C(f) REPL_COUNTER(struct cuju_sender_stats, f)
static const struct repl_counter sender_counters[] = {
    C(epochs_staged), C(epochs_shipped), C(epochs_acked), C(pages), C(zero_pages),
    C(devstate_bytes), C(disk_bytes), C(wire_bytes), C(saved_bytes), C(stage_ns), C(last_stage_ns),
    C(send_ns), C(last_send_ns), C(ack_wait_ns), C(last_ack_wait_ns), C(last_staged_epoch),
    C(last_shipped_epoch), C(last_acked_epoch), C(errors),
};
#undef C

static PyObject *
Sender_counters(SenderObject *self, PyObject *Py_UNUSED(ignored))
{
    struct cuju_sender_stats st;
    if (self->s == NULL)
        return PyDict_New();
    cuju_sender_stats(self->s, &st);
    return repl_counters(&st, sender_counters, sizeof(sender_counters) / sizeof(sender_counters[0]));
}

static PyObject *
Sender_close(SenderObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"orderly", "timeout", NULL};
    int orderly = 1, ms, rc;
    PyObject *timeout = Py_None;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|pO:close", kwlist, &orderly, &timeout))
        return NULL;
    if (repl_timeout_ms(timeout, &ms) < 0)
        return NULL;
    if (self->s == NULL || self->busy_close)
        Py_RETURN_NONE;
    self->busy_close = 1;
    Py_BEGIN_ALLOW_THREADS
    rc = cuju_sender_close(self->s, orderly, ms);
    Py_END_ALLOW_THREADS
    /* The threads are joined: nothing reads the borrowed parts any more. */
    sender_release_held(self, 0);
    sender_release_held(self, 1);
    if (rc != CUJU_OK) {
        sender_raise(self, rc, "closing the link failed");
        return NULL;
    }
    Py_RETURN_NONE;
}

static void
Sender_dealloc(SenderObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    if (self->s != NULL) {
        struct cuju_sender *s = self->s;
        self->s = NULL;
        Py_BEGIN_ALLOW_THREADS
        cuju_sender_free(s);
        Py_END_ALLOW_THREADS
    }
    sender_release_held(self, 0);
    sender_release_held(self, 1);
    if (self->region.obj)
        PyBuffer_Release(&self->region);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyMethodDef Sender_methods[] = {
    {"handshake", (PyCFunction)(void (*)(void))Sender_handshake, METH_VARARGS | METH_KEYWORDS,
     "handshake(timeout=None) -> int\n\nSend HELLO, check the backup's reply, start the send and ack "
     "threads.\nReturns the epoch the backup holds (0: none)."},
    {"stage", (PyCFunction)(void (*)(void))Sender_stage, METH_VARARGS | METH_KEYWORDS,
     "stage(epoch, dirty_indexes, device_state, timeout=None, disks=None)\n\nGather the pages, the device "
     "state and the disk parts ((disk, records[, borrowed])) into a\nstaging buffer (waits while both buffers "
     "are busy). Call while the VM is paused.\nBorrowed records are sent from where they lie and held until the "
     "buffer is staged\nagain or the sender is closed: keep them unchanged until the epoch is acknowledged."},
    {"ship", (PyCFunction)Sender_ship, METH_NOARGS, "ship()\n\nQueue the staged epoch for sending."},
    {"wait_ack", (PyCFunction)(void (*)(void))Sender_wait_ack, METH_VARARGS | METH_KEYWORDS,
     "wait_ack(epoch, timeout=None) -> bool\n\nTrue once `epoch` is acknowledged, False on timeout."},
    {"counters", (PyCFunction)Sender_counters, METH_NOARGS, "counters() -> dict[str, int]"},
    {"close", (PyCFunction)(void (*)(void))Sender_close, METH_VARARGS | METH_KEYWORDS,
     "close(orderly=True, timeout=None)\n\nOrderly: send what is queued, then CLOSE, and wait for the "
     "backup's last acks."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Sender_slots[] = {
    {Py_tp_doc, "Sender(fd, region, *, page_size=4096, session_id=0, io_timeout=None)\n\n"
                "Primary side of the FT link (wire.h). fd is duplicated; region is a buffer\n"
                "over guest RAM, held until the object is freed."},
    {Py_tp_init, Sender_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, Sender_dealloc},
    {Py_tp_methods, Sender_methods},
    {0, NULL},
};

static PyType_Spec Sender_spec = {
    .name = "cuju_libvirt._cuju.Sender",
    .basicsize = sizeof(SenderObject),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = Sender_slots,
};

/* ---- Receiver ---- */

typedef struct {
    PyObject_HEAD
    struct cuju_receiver *r;    /* GIL */
    Py_buffer region;           /* GIL: held for the object's lifetime */
    int started;                /* GIL */
    int closed;                 /* GIL */
} ReceiverObject;

static void
receiver_raise(ReceiverObject *self, int code, const char *fallback)
{
    char msg[CUJU_ERRMSG_LEN];
    int eno = 0, peer = 0;
    int first = cuju_receiver_error(self->r, &eno, &peer, msg, sizeof(msg));
    repl_raise_recorded(code, first, eno, peer, msg, fallback);
}

static int
Receiver_init(ReceiverObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"region", "device_state_path", "journal_path", "page_size", "durable", "disks",
                             NULL};
    Py_buffer region = {0};
    PyObject *dev_o = NULL, *jnl_o = NULL, *disks = NULL, *dseq = NULL;
    unsigned int page_size = 4096;
    int durable = 0, rc;
    char msg[CUJU_ERRMSG_LEN] = "";
    int fds[CUJU_DJ_MAX_DISKS];
    uint64_t sizes[CUJU_DJ_MAX_DISKS];
    struct cuju_disk_set dset = {0, fds, sizes};

    if (self->r != NULL) {
        PyErr_SetString(PyExc_TypeError, "Receiver is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "w*O&O&|$IpO:Receiver", kwlist, &region, PyUnicode_FSConverter,
                                     &dev_o, PyUnicode_FSConverter, &jnl_o, &page_size, &durable, &disks))
        goto error;
    if (repl_check_region(&region, page_size) < 0)
        goto error;
    if (disks != NULL && disks != Py_None) {
        dseq = PySequence_Fast(disks, "disks must be a sequence of (fd, size) of the replica images");
        if (dseq == NULL)
            goto error;
        if (PySequence_Fast_GET_SIZE(dseq) > (Py_ssize_t)CUJU_DJ_MAX_DISKS) {
            PyErr_Format(PyExc_ValueError, "at most %u disks", CUJU_DJ_MAX_DISKS);
            goto error;
        }
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(dseq); i++) {
            int fd;
            unsigned long long size;
            if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(dseq, i), "iK:disks", &fd, &size))
                goto error;
            if (size == 0 || size % 512) {
                PyErr_Format(PyExc_ValueError, "disk %zd: size %llu must be a positive multiple of 512", i, size);
                goto error;
            }
            int d = repl_dup_fd(fd);
            if (d < 0)
                goto error;
            fds[dset.n] = d;
            sizes[dset.n] = size;
            dset.n++;
        }
    }
    const char *dev = PyBytes_AS_STRING(dev_o), *jnl = PyBytes_AS_STRING(jnl_o);
    Py_BEGIN_ALLOW_THREADS
    rc = cuju_receiver_open(region.buf, (uint64_t)region.len, page_size, dev, jnl, durable, &dset, &self->r, msg,
                            sizeof(msg));
    Py_END_ALLOW_THREADS
    if (rc == CUJU_OK)
        dset.n = 0;     /* the receiver owns them now */
    if (rc != CUJU_OK) {
        if (rc == CUJU_E_ARG)
            PyErr_SetString(PyExc_ValueError, msg);
        else
            repl_raise(rc, 0, 0, msg);
        goto error;
    }
    self->region = region;
    Py_XDECREF(dseq);
    Py_DECREF(dev_o);
    Py_DECREF(jnl_o);
    return 0;

error:
    for (unsigned i = 0; i < dset.n; i++)
        close(fds[i]);
    Py_XDECREF(dseq);
    Py_XDECREF(dev_o);
    Py_XDECREF(jnl_o);
    if (region.obj)
        PyBuffer_Release(&region);
    return -1;
}

static PyObject *
Receiver_start(ReceiverObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "io_timeout", "handshake_timeout", "link_keys", NULL};
    int fd, dfd, io_ms, hs_ms, rc;
    PyObject *io_t = Py_None, *hs_t = Py_None;
    Py_buffer keys = {0};

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i|OO$z*:start", kwlist, &fd, &io_t, &hs_t, &keys))
        return NULL;
    rc = repl_check_keys(&keys);
    if (rc == 0 && (repl_timeout_ms(io_t, &io_ms) < 0 || repl_timeout_ms(hs_t, &hs_ms) < 0))
        rc = -1;
    if (rc == 0 && (self->r == NULL || self->closed || self->started)) {
        PyErr_SetString(PyExc_ValueError, "a Receiver serves one connection: create a new one");
        rc = -1;
    }
    if (rc == 0 && keys.buf != NULL && cuju_receiver_set_keys(self->r, keys.buf) != CUJU_OK) {
        PyErr_SetString(PyExc_ValueError, "the Receiver's link keys are already set");
        rc = -1;
    }
    if (keys.obj)
        PyBuffer_Release(&keys);
    if (rc < 0)
        return NULL;
    dfd = repl_dup_fd(fd);
    if (dfd < 0)
        return NULL;
    rc = cuju_receiver_start(self->r, dfd, io_ms, hs_ms);
    if (rc != CUJU_OK) {
        receiver_raise(self, rc, "cannot start the receiver");
        return NULL;
    }
    self->started = 1;
    Py_RETURN_NONE;
}

static PyObject *
Receiver_wait(ReceiverObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"timeout", NULL};
    PyObject *timeout = Py_None;
    int ms, rc;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O:wait", kwlist, &timeout))
        return NULL;
    if (repl_timeout_ms(timeout, &ms) < 0)
        return NULL;
    if (self->r == NULL || !self->started) {
        PyErr_SetString(PyExc_ValueError, "the receiver was not started");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = cuju_receiver_wait(self->r, ms);
    Py_END_ALLOW_THREADS
    if (rc == CUJU_OK)
        Py_RETURN_TRUE;
    if (rc == CUJU_E_TIMEOUT)
        Py_RETURN_FALSE;
    receiver_raise(self, rc, "the session failed");
    return NULL;
}

#define C(f) REPL_COUNTER(struct cuju_receiver_stats, f)
static const struct repl_counter receiver_counters[] = {
    C(epochs_received), C(epochs_applied), C(epochs_replayed), C(pages), C(zero_pages),
    C(wire_bytes), C(devstate_bytes), C(disk_records), C(disk_bytes), C(receive_ns), C(last_receive_ns), C(verify_ns),
    C(last_verify_ns), C(apply_ns), C(last_apply_ns), C(last_acked_epoch), C(last_applied_epoch),
    C(errors),
};
#undef C

static PyObject *
Receiver_counters(ReceiverObject *self, PyObject *Py_UNUSED(ignored))
{
    struct cuju_receiver_stats st;
    if (self->r == NULL)
        return PyDict_New();
    cuju_receiver_stats(self->r, &st);
    return repl_counters(&st, receiver_counters, sizeof(receiver_counters) / sizeof(receiver_counters[0]));
}

static PyObject *
Receiver_get_last_applied(ReceiverObject *self, void *Py_UNUSED(closure))
{
    if (self->r == NULL)
        return PyLong_FromLong(0);
    return PyLong_FromUnsignedLongLong(cuju_receiver_last_applied(self->r));
}

static PyObject *
Receiver_error(ReceiverObject *self, PyObject *Py_UNUSED(ignored))
{
    char msg[CUJU_ERRMSG_LEN];
    int eno = 0, peer = 0;
    if (self->r == NULL)
        Py_RETURN_NONE;
    int code = cuju_receiver_error(self->r, &eno, &peer, msg, sizeof(msg));
    if (code == CUJU_OK)
        Py_RETURN_NONE;
    return Py_BuildValue("(isii)", code, msg, eno, peer);
}

static PyObject *
Receiver_close(ReceiverObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->r == NULL || self->closed)
        Py_RETURN_NONE;
    self->closed = 1;
    Py_BEGIN_ALLOW_THREADS
    cuju_receiver_close(self->r);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static void
Receiver_dealloc(ReceiverObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    if (self->r != NULL) {
        struct cuju_receiver *r = self->r;
        self->r = NULL;
        Py_BEGIN_ALLOW_THREADS
        cuju_receiver_free(r);
        Py_END_ALLOW_THREADS
    }
    if (self->region.obj)
        PyBuffer_Release(&self->region);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyMethodDef Receiver_methods[] = {
    {"start", (PyCFunction)(void (*)(void))Receiver_start, METH_VARARGS | METH_KEYWORDS,
     "start(fd, io_timeout=None, handshake_timeout=None)\n\nTake a duplicate of fd and serve one session "
     "in C threads."},
    {"wait", (PyCFunction)(void (*)(void))Receiver_wait, METH_VARARGS | METH_KEYWORDS,
     "wait(timeout=None) -> bool\n\nTrue when the session ended with CLOSE, False on timeout;\nraises "
     "the session's failure."},
    {"counters", (PyCFunction)Receiver_counters, METH_NOARGS, "counters() -> dict[str, int]"},
    {"error", (PyCFunction)Receiver_error, METH_NOARGS,
     "error() -> (code, message, errno, peer_code) | None"},
    {"close", (PyCFunction)Receiver_close, METH_NOARGS,
     "close()\n\nStop receiving; what is committed is still applied."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Receiver_getset[] = {
    {"last_applied", (getter)Receiver_get_last_applied, NULL, "the epoch the region holds (0: none)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Receiver_slots[] = {
    {Py_tp_doc, "Receiver(region, device_state_path, journal_path, *, page_size=4096, durable=False)\n\n"
                "Backup side of the FT link (wire.h). Opening replays committed, unapplied\n"
                "epochs from the journal, so last_applied is exact before any handshake."},
    {Py_tp_init, Receiver_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, Receiver_dealloc},
    {Py_tp_methods, Receiver_methods},
    {Py_tp_getset, Receiver_getset},
    {0, NULL},
};

static PyType_Spec Receiver_spec = {
    .name = "cuju_libvirt._cuju.Receiver",
    .basicsize = sizeof(ReceiverObject),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = Receiver_slots,
};

/* ---- DiskJournal (cujud's side of diskjournal.h) ---- */

typedef struct {
    PyObject_HEAD
    struct cuju_dj *dj;         /* GIL: NULL once closed */
    Py_ssize_t exports;         /* GIL: buffers handed out over the mapping */
} DiskJournalObject;

static int
dj_ready(DiskJournalObject *self)
{
    if (self->dj == NULL) {
        PyErr_SetString(PyExc_ValueError, "the disk journal is closed");
        return 0;
    }
    return 1;
}

static int
DiskJournal_init(DiskJournalObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"path", NULL};
    PyObject *path = NULL;
    char msg[256] = "";
    int rc;
    if (self->dj != NULL) {
        PyErr_SetString(PyExc_TypeError, "DiskJournal is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O&:DiskJournal", kwlist, PyUnicode_FSConverter, &path))
        return -1;
    Py_BEGIN_ALLOW_THREADS
    rc = cuju_dj_open(PyBytes_AS_STRING(path), &self->dj, msg, sizeof(msg));
    Py_END_ALLOW_THREADS
    Py_DECREF(path);
    if (rc != CUJU_OK) {
        repl_raise(rc, 0, 0, msg);
        return -1;
    }
    return 0;
}

static PyObject *
DiskJournal_info(DiskJournalObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!dj_ready(self))
        return NULL;
    const struct cuju_dj_header *h = self->dj->h;
    PyObject *bufs = Py_BuildValue(
        "((KKIK)(KKIK))", (unsigned long long)h->buf[0].used, (unsigned long long)h->buf[0].records,
        h->buf[0].overflow, (unsigned long long)h->buf[0].epoch, (unsigned long long)h->buf[1].used,
        (unsigned long long)h->buf[1].records, h->buf[1].overflow, (unsigned long long)h->buf[1].epoch);
    if (bufs == NULL)
        return NULL;
    return Py_BuildValue(
        "{sKsKsKsKsKsKsKsIsNsKsKsKsKsKsKsKsK}", "disk_size", (unsigned long long)h->disk_size, "capacity",
        (unsigned long long)h->capacity, "block_size", (unsigned long long)h->block_size, "bitmap_bytes",
        (unsigned long long)h->bitmap_bytes, "nblocks", (unsigned long long)cuju_dj_nblocks(self->dj),
        "server_pid", (unsigned long long)h->server_pid, "generation", (unsigned long long)h->generation,
        "active", __atomic_load_n(&h->active, __ATOMIC_SEQ_CST), "buffers", bufs, "writes",
        (unsigned long long)h->n_writes, "zeroes", (unsigned long long)h->n_zeroes, "trims",
        (unsigned long long)h->n_trims, "flushes", (unsigned long long)h->n_flushes, "bytes_written",
        (unsigned long long)h->bytes_written, "overflows", (unsigned long long)h->n_overflows, "seals",
        (unsigned long long)h->seals, "lineage", (unsigned long long)h->lineage);
}

static PyObject *
DiskJournal_seal(DiskJournalObject *self, PyObject *args)
{
    unsigned long long epoch;
    int idx;
    if (!PyArg_ParseTuple(args, "K:seal", &epoch) || !dj_ready(self))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    idx = cuju_dj_seal(self->dj, epoch);
    Py_END_ALLOW_THREADS
    if (idx == -1) {
        PyErr_SetString(PyExc_ValueError, "seal(): the other buffer still holds an unacknowledged epoch "
                        "(reset() it first)");
        return NULL;
    }
    if (idx < 0) {
        repl_raise(CUJU_E_JOURNAL, 0, 0, "the block server did not finish an append within 2 s "
                   "(it died in the middle of one?)");
        return NULL;
    }
    return PyLong_FromLong(idx);
}

static PyObject *
DiskJournal_reset(DiskJournalObject *self, PyObject *args)
{
    int idx;
    if (!PyArg_ParseTuple(args, "i:reset", &idx) || !dj_ready(self))
        return NULL;
    if (cuju_dj_reset(self->dj, idx) != CUJU_OK) {
        PyErr_Format(PyExc_ValueError, "reset(%d): not a sealed buffer (0 or 1, not the active one)", idx);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* (offset in the mapping, bytes) of buffer idx's records / bitmap. */
static PyObject *
DiskJournal_spans(DiskJournalObject *self, PyObject *args)
{
    int idx;
    if (!PyArg_ParseTuple(args, "i:spans", &idx) || !dj_ready(self))
        return NULL;
    if (idx < 0 || idx > 1) {
        PyErr_SetString(PyExc_ValueError, "buffer index must be 0 or 1");
        return NULL;
    }
    struct cuju_dj *dj = self->dj;
    uint64_t used = __atomic_load_n(&dj->h->buf[idx].used, __ATOMIC_ACQUIRE);
    return Py_BuildValue("(nKnKI)", (Py_ssize_t)(cuju_dj_records(dj, idx) - dj->mem), (unsigned long long)used,
                         (Py_ssize_t)(cuju_dj_bitmap(dj, idx) - dj->mem), (unsigned long long)dj->h->bitmap_bytes,
                         dj->h->buf[idx].overflow);
}

static PyObject *
DiskJournal_close(DiskJournalObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->dj == NULL)
        Py_RETURN_NONE;
    if (self->exports > 0) {
        PyErr_SetString(PyExc_BufferError, "the disk journal still has memoryviews over it");
        return NULL;
    }
    cuju_dj_close(self->dj);
    self->dj = NULL;
    Py_RETURN_NONE;
}

static int
DiskJournal_getbuffer(DiskJournalObject *self, Py_buffer *view, int flags)
{
    if (!dj_ready(self)) {
        view->obj = NULL;
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->dj->mem, (Py_ssize_t)self->dj->len, 0, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void
DiskJournal_releasebuffer(DiskJournalObject *self, Py_buffer *Py_UNUSED(view))
{
    self->exports--;
}

static void
DiskJournal_dealloc(DiskJournalObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    cuju_dj_close(self->dj);
    self->dj = NULL;
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyMethodDef DiskJournal_methods[] = {
    {"info", (PyCFunction)DiskJournal_info, METH_NOARGS, "info() -> dict: geometry, buffers, server counters"},
    {"seal", (PyCFunction)DiskJournal_seal, METH_VARARGS,
     "seal(epoch) -> int\n\nSwitch the server to the other buffer; return the sealed one's index."},
    {"reset", (PyCFunction)DiskJournal_reset, METH_VARARGS, "reset(idx)\n\nForget a sealed buffer."},
    {"spans", (PyCFunction)DiskJournal_spans, METH_VARARGS,
     "spans(idx) -> (records_offset, records_len, bitmap_offset, bitmap_len, overflow)\n\nWhere buffer idx "
     "lies in the mapping (memoryview(journal))."},
    {"close", (PyCFunction)DiskJournal_close, METH_NOARGS, "close()"},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot DiskJournal_slots[] = {
    {Py_tp_doc, "DiskJournal(path)\n\nThe epoch journal of one disk's block server (diskjournal.h), mapped;\n"
                "the buffer protocol exposes the whole mapping."},
    {Py_tp_init, DiskJournal_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, DiskJournal_dealloc},
    {Py_tp_methods, DiskJournal_methods},
    {Py_bf_getbuffer, DiskJournal_getbuffer},
    {Py_bf_releasebuffer, DiskJournal_releasebuffer},
    {0, NULL},
};

static PyType_Spec DiskJournal_spec = {
    .name = "cuju_libvirt._cuju.DiskJournal",
    .basicsize = sizeof(DiskJournalObject),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = DiskJournal_slots,
};

static PyObject *
repl_disk_build(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"bitmap", "block_size", "disk_size", "image_fd", "cursor", "out", NULL};
    Py_buffer bm = {0}, out = {0};
    unsigned long long bs, size, cursor;
    int fd, rc, eno = 0;
    uint64_t len = 0, cur;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*KKiKw*:disk_build", kwlist, &bm, &bs, &size, &fd, &cursor,
                                     &out))
        return NULL;
    uint64_t nblocks = bs ? (size + bs - 1) / bs : 0;
    if (bs < 4096 || (bs & (bs - 1)) || (uint64_t)bm.len * 8 < nblocks || ((uintptr_t)out.buf & 7)) {
        PyErr_SetString(PyExc_ValueError, "disk_build: block_size must be a power of two >= 4096, the bitmap "
                        "must cover the disk and out must be 8-byte aligned");
        goto error;
    }
    cur = cursor;
    Py_BEGIN_ALLOW_THREADS
    rc = cuju_dj_build_from_bitmap(bm.buf, nblocks, bs, size, fd, &cur, out.buf, (uint64_t)out.len, &len, &eno);
    Py_END_ALLOW_THREADS
    if (rc != CUJU_OK) {
        errno = eno;
        PyErr_SetFromErrno(PyExc_OSError);
        goto error;
    }
    PyBuffer_Release(&bm);
    PyBuffer_Release(&out);
    return Py_BuildValue("(KK)", (unsigned long long)len, (unsigned long long)cur);

error:
    if (bm.obj)
        PyBuffer_Release(&bm);
    if (out.obj)
        PyBuffer_Release(&out);
    return NULL;
}

static PyObject *
repl_disk_mark_allocated(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"image_fd", "disk_size", "block_size", "bitmap", NULL};
    Py_buffer bm = {0};
    unsigned long long bs, size;
    int fd, rc, eno = 0;
    uint64_t nset = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iKKw*:disk_mark_allocated", kwlist, &fd, &size, &bs, &bm))
        return NULL;
    if (bs < 4096 || (bs & (bs - 1)) || (uint64_t)bm.len * 8 < (size + bs - 1) / bs) {
        PyBuffer_Release(&bm);
        PyErr_SetString(PyExc_ValueError, "disk_mark_allocated: bad block size or bitmap too small");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = cuju_dj_mark_allocated(fd, size, bs, bm.buf, &nset, &eno);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&bm);
    if (rc != CUJU_OK) {
        errno = eno;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromUnsignedLongLong(nset);
}

/* ---- module functions ---- */

static PyObject *
repl_checksum(PyObject *Py_UNUSED(module), PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"data", "seed", NULL};
    Py_buffer data;
    unsigned long long seed = 0;
    uint64_t h;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*|K:checksum", kwlist, &data, &seed))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    h = cuju_csum(data.buf, (size_t)data.len, seed);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLongLong(h);
}

/* The benchmark's baseline: the same socket loop without the protocol. */
static PyObject *
repl_raw_io(PyObject *args, PyObject *kwds, int sending)
{
    static char *kwlist[] = {"fd", "buffer", "timeout", NULL};
    int fd, ms, rc, eno = 0;
    Py_buffer b = {0};
    PyObject *timeout = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, sending ? "iy*|O:raw_send" : "iw*|O:raw_recv", kwlist, &fd, &b,
                                     &timeout))
        return NULL;
    if (repl_timeout_ms(timeout, &ms) < 0) {
        PyBuffer_Release(&b);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = sending ? cuju_send_all(fd, b.buf, (size_t)b.len, ms, &eno) : cuju_recv_all(fd, b.buf, (size_t)b.len, ms, &eno);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    if (rc != CUJU_OK) {
        repl_raise(rc, eno, 0, NULL);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
repl_raw_send(PyObject *Py_UNUSED(module), PyObject *args, PyObject *kwds)
{
    return repl_raw_io(args, kwds, 1);
}

static PyObject *
repl_raw_recv(PyObject *Py_UNUSED(module), PyObject *args, PyObject *kwds)
{
    return repl_raw_io(args, kwds, 0);
}

#define REPL_METHODS \
    {"checksum", (PyCFunction)(void (*)(void))repl_checksum, METH_VARARGS | METH_KEYWORDS, \
     "checksum(data, seed=0) -> int\n\nThe wire format's epoch checksum (seeded CRC-32C, see checksum.h)."}, \
    {"raw_send", (PyCFunction)(void (*)(void))repl_raw_send, METH_VARARGS | METH_KEYWORDS, \
     "raw_send(fd, buffer, timeout=None)\n\nWrite all of buffer to fd (benchmark baseline)."}, \
    {"raw_recv", (PyCFunction)(void (*)(void))repl_raw_recv, METH_VARARGS | METH_KEYWORDS, \
     "raw_recv(fd, buffer, timeout=None)\n\nFill buffer from fd (benchmark baseline)."}, \
    {"disk_build", (PyCFunction)(void (*)(void))repl_disk_build, METH_VARARGS | METH_KEYWORDS, \
     "disk_build(bitmap, block_size, disk_size, image_fd, cursor, out) -> (nbytes, next_cursor)\n\n" \
     "Disk records for the blocks set in bitmap, read from the image (diskjournal.h)."}, \
    {"disk_mark_allocated", (PyCFunction)(void (*)(void))repl_disk_mark_allocated, \
     METH_VARARGS | METH_KEYWORDS, "disk_mark_allocated(image_fd, disk_size, block_size, bitmap) -> int\n\n" \
     "Set the bits of every block holding data (SEEK_DATA/SEEK_HOLE); returns bits newly set."},

static int
repl_add_int(PyObject *m, const char *name, long v)
{
    return PyModule_AddIntConstant(m, name, v);
}

static int
repl_exec(PyObject *m, PyObject *features)
{
    if (cuju_add_type(m, &Sender_spec, "Sender") < 0 || cuju_add_type(m, &Receiver_spec, "Receiver") < 0 ||
        cuju_add_type(m, &DiskJournal_spec, "DiskJournal") < 0)
        return -1;
    if (repl_add_int(m, "MAX_DISK_SECTION", (long)CUJU_WIRE_MAX_DISK) < 0 ||
        repl_add_int(m, "DISK_RECORD_LEN", (long)CUJU_DJ_REC_LEN) < 0 ||
        repl_add_int(m, "DISK_PART_LEN", (long)CUJU_DJ_PART_LEN) < 0 ||
        repl_add_int(m, "MAX_DISKS", (long)CUJU_DJ_MAX_DISKS) < 0 ||
        cuju_add_feature(features, "disks") < 0)
        return -1;
    if (repl_add_int(m, "MAX_DEVICE_STATE", (long)CUJU_WIRE_MAX_DEVSTATE) < 0)
        return -1;
    if (cuju_add_feature(features, "link_aead") < 0)
        return -1;
    if (repl_add_int(m, "LINK_KEYS_LEN", (long)CUJU_LINK_KEYS_LEN) < 0)
        return -1;
    return cuju_add_feature(features, "replicate");
}
/* ======================= END replicate block ========================== */

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
    if (repl_exec(m, features) < 0)
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
    REPL_METHODS
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
