/*
 * Native fast paths of the SIP codec (app/dmq/sip.py), for the common case only.
 *
 * Why: in the compiled core, reading a KDMQ request (its header block, its top Via and
 * its CSeq) was about three quarters of the CPU a request costs, most of it spent
 * making and dropping the small strings and tuples that str.partition and str.strip
 * return for every header line. These functions read the same text in one pass over
 * the bytes and build only the objects the parser returns.
 *
 * Each function accepts only the plain shape of its input: printable ASCII (tabs
 * allowed where noted), CRLF line ends, no folded lines, no comma-separated Via list,
 * no IPv6 reference, nothing that would be an error. For anything else it returns
 * None, and the caller runs the Python code, which is the reference: the same
 * message, the same error, the same objects. So these functions never raise for what
 * the other side sent, and what they return is equal to what the Python code would
 * return for the same input (tests/dmq/test_native_codec.py compares the two).
 *
 * One for the htable mirror rather than the SIP codec: scan_set() reads the usual
 * htable SET body, under the same rule (None for anything else, equal results).
 *
 * One more, for the driver rather than the codec: sendmmsg() sends the datagrams a
 * turn of the loop produced in a few system calls instead of one each (see its own
 * notes below).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* sendmmsg needs _GNU_SOURCE, which Python.h (pyconfig.h) defines on Linux. */
#ifdef __linux__
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <sys/socket.h>
#define HAVE_SENDMMSG 1
#endif

/* Canonical header names, interned once: the parser hands the same objects out. */
static const char *const KNOWN_NAMES[] = {
    "via", "from", "to", "call-id", "cseq", "max-forwards", "content-type",
    "content-length", "user-agent", "server", "allow", "supported", "contact",
    "x-dmq-origin", NULL,
};
#define N_KNOWN (sizeof(KNOWN_NAMES) / sizeof(KNOWN_NAMES[0]) - 1)
static PyObject *known_objects[N_KNOWN];
static PyObject *str_via;

/* RFC 3261 section 7.3.3 compact forms, as in sip.COMPACT_FORMS. */
static const char *compact_form(char c) {
    switch (c) {
    case 'a': return "accept-contact";
    case 'b': return "referred-by";
    case 'c': return "content-type";
    case 'd': return "request-disposition";
    case 'e': return "content-encoding";
    case 'f': return "from";
    case 'i': return "call-id";
    case 'j': return "reject-contact";
    case 'k': return "supported";
    case 'l': return "content-length";
    case 'm': return "contact";
    case 'n': return "identity-info";
    case 'o': return "event";
    case 'r': return "refer-to";
    case 's': return "subject";
    case 't': return "to";
    case 'u': return "allow-events";
    case 'v': return "via";
    case 'x': return "session-expires";
    case 'y': return "identity";
    default: return NULL;
    }
}

/* sip._TOKEN_RE: [A-Za-z0-9\-.!%*_+`'~] */
static int is_token_char(unsigned char c) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
        return 1;
    switch (c) {
    case '-': case '.': case '!': case '%': case '*': case '_': case '+': case '`':
    case '\'': case '~':
        return 1;
    default:
        return 0;
    }
}

static PyObject *ascii_str(const char *text, Py_ssize_t length) {
    /* The input is checked to be ASCII, so the one-byte kind is exact. */
    PyObject *out = PyUnicode_New(length, 127);
    if (out != NULL)
        memcpy(PyUnicode_DATA(out), text, (size_t)length);
    return out;
}

/* The object for a canonical (already lower-case) header name. New reference. */
static PyObject *canonical_object(const char *name, Py_ssize_t length) {
    size_t i;
    for (i = 0; i < N_KNOWN; i++) {
        const char *known = KNOWN_NAMES[i];
        if ((Py_ssize_t)strlen(known) == length && memcmp(known, name, (size_t)length) == 0) {
            Py_INCREF(known_objects[i]);
            return known_objects[i];
        }
    }
    return ascii_str(name, length);
}

static int is_space(char c) { return c == ' ' || c == '\t'; }

static void strip(const char **start, const char **end) {
    while (*start < *end && is_space(**start))
        (*start)++;
    while (*end > *start && is_space((*end)[-1]))
        (*end)--;
}

/* Digits only, at most 9 of them (no overflow); -1 otherwise. */
static long small_number(const char *start, const char *end) {
    long value = 0;
    if (start == end || end - start > 9)
        return -1;
    for (; start < end; start++) {
        if (*start < '0' || *start > '9')
            return -1;
        value = value * 10 + (*start - '0');
    }
    return value;
}

/* The start line, as sip._parse_request_line / _parse_status_line read it (with the
 * version checked): 0 and the parts, or -1 for anything the Python code must see. */
static int start_line(const char *line, const char *end, PyObject **method, PyObject **uri,
                      long *code, PyObject **reason) {
    const char *space1 = memchr(line, ' ', (size_t)(end - line));
    const char *space2;
    if (space1 == NULL)
        return -1;
    if (end - line >= 4 && memcmp(line, "SIP/", 4) == 0) {
        const char *code_end;
        if (space1 - line != 7 || memcmp(line, "SIP/2.0", 7) != 0)
            return -1;
        code_end = memchr(space1 + 1, ' ', (size_t)(end - space1 - 1));
        if (code_end == NULL)
            code_end = end;
        if (code_end - space1 - 1 != 3)
            return -1;
        *code = small_number(space1 + 1, code_end);
        if (*code < 100 || *code > 699)
            return -1;
        *reason = code_end < end ? ascii_str(code_end + 1, end - code_end - 1) : ascii_str("", 0);
        return *reason == NULL ? -2 : 0;
    }
    space2 = memchr(space1 + 1, ' ', (size_t)(end - space1 - 1));
    if (space2 == NULL || memchr(space2 + 1, ' ', (size_t)(end - space2 - 1)) != NULL)
        return -1;
    if (end - space2 - 1 != 7 || memcmp(space2 + 1, "SIP/2.0", 7) != 0)
        return -1;
    if (space1 == line)
        return -1;
    for (const char *p = line; p < space1; p++)
        if (!is_token_char((unsigned char)*p))
            return -1;
    if (space2 == space1 + 1 || memchr(space1 + 1, ':', (size_t)(space2 - space1 - 1)) == NULL)
        return -1;
    *method = ascii_str(line, space1 - line);
    *uri = ascii_str(space1 + 1, space2 - space1 - 1);
    if (*method == NULL || *uri == NULL)
        return -2;
    return 0;
}

/* One header line "name: value" added to items/first/vias as parse_message does.
 * 0 on success, -1 to fall back, -2 on a Python error. */
static int header_line(const char *line, const char *end, PyObject *items, PyObject *first,
                       PyObject *vias, long *content_length) {
    const char *colon = memchr(line, ':', (size_t)(end - line));
    const char *name_start = line, *name_end, *value_start, *value_end;
    char lowered[64];
    Py_ssize_t length, i;
    PyObject *name, *value, *item;
    const char *canonical;
    int is_via, status;

    if (colon == NULL || is_space(*line))
        return -1;
    name_end = colon;
    strip(&name_start, &name_end);
    length = name_end - name_start;
    if (length == 0 || length > (Py_ssize_t)sizeof(lowered))
        return -1;
    for (i = 0; i < length; i++) {
        unsigned char c = (unsigned char)name_start[i];
        if (!is_token_char(c))
            return -1;
        lowered[i] = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
    }
    canonical = length == 1 ? compact_form(lowered[0]) : NULL;
    name = canonical != NULL ? canonical_object(canonical, (Py_ssize_t)strlen(canonical))
                             : canonical_object(lowered, length);
    if (name == NULL)
        return -2;
    value_start = colon + 1;
    value_end = end;
    strip(&value_start, &value_end);
    is_via = name == str_via;
    if (is_via && memchr(value_start, ',', (size_t)(value_end - value_start)) != NULL) {
        Py_DECREF(name);
        return -1; /* a Via list: split by the Python code */
    }
    if (PyUnicode_GET_LENGTH(name) == 14 && memcmp(PyUnicode_DATA(name), "content-length", 14) == 0
        && *content_length == -1) {
        *content_length = small_number(value_start, value_end);
        if (*content_length < 0) {
            Py_DECREF(name);
            return -1; /* not a plain number: the Python code says what is wrong */
        }
    }
    value = ascii_str(value_start, value_end - value_start);
    if (value == NULL) {
        Py_DECREF(name);
        return -2;
    }
    item = PyTuple_Pack(2, name, value);
    status = item == NULL || PyList_Append(items, item) < 0 ? -2 : 0;
    Py_XDECREF(item);
    if (status == 0 && is_via && PyList_Append(vias, value) < 0)
        status = -2;
    if (status == 0) {
        PyObject *known = PyDict_SetDefault(first, name, value);
        if (known == NULL)
            status = -2;
    }
    Py_DECREF(name);
    Py_DECREF(value);
    return status;
}

PyDoc_STRVAR(scan_doc,
"scan(data) -> (method, uri, code, reason, items, first, vias, body) or None\n\n"
"Read a whole SIP message of the plain shape (see the module's notes). ``method`` is\n"
"None for a response; ``items``, ``first`` and ``vias`` are what sip.Headers takes;\n"
"``body`` is cut to Content-Length. None means: parse it with the Python code.");

static PyObject *scan(PyObject *module, PyObject *arg) {
    (void)module;
    const char *data, *end, *first_lf, *head_end, *line, *p;
    Py_ssize_t size;
    PyObject *method = NULL, *uri = NULL, *reason = NULL, *items = NULL, *first = NULL;
    PyObject *vias = NULL, *body = NULL, *result = NULL;
    long code = 0, content_length = -1;
    int status;

    if (!PyBytes_Check(arg))
        Py_RETURN_NONE; /* a bytearray or memoryview: the Python code reads it */
    data = PyBytes_AS_STRING(arg);
    size = PyBytes_GET_SIZE(arg);
    end = data + size;
    if (size == 0 || data[0] == '\r' || data[0] == '\n')
        Py_RETURN_NONE;
    first_lf = memchr(data, '\n', (size_t)size);
    if (first_lf == NULL || first_lf[-1] != '\r')
        Py_RETURN_NONE;
    /* The first CRLF CRLF ends the header block; every byte before it must be
     * printable ASCII, a tab, or part of a CRLF. */
    head_end = NULL;
    for (p = data; p < end; p++) {
        unsigned char c = (unsigned char)*p;
        if (c >= 0x20 && c < 0x7f)
            continue;
        if (c == '\t')
            continue;
        if (c == '\r' && p + 1 < end && p[1] == '\n') {
            if (p + 3 < end && p[2] == '\r' && p[3] == '\n') {
                head_end = p;
                break;
            }
            p++;
            continue;
        }
        Py_RETURN_NONE;
    }
    if (head_end == NULL)
        Py_RETURN_NONE;

    line = data;
    p = memchr(line, '\r', (size_t)(head_end - line));
    if (p == NULL)
        p = head_end;
    status = start_line(line, p, &method, &uri, &code, &reason);
    if (status != 0)
        goto done;
    items = PyList_New(0);
    first = PyDict_New();
    vias = PyList_New(0);
    if (items == NULL || first == NULL || vias == NULL) {
        status = -2;
        goto done;
    }
    while (p < head_end) {
        const char *next;
        line = p + 2;
        next = memchr(line, '\r', (size_t)(head_end - line));
        if (next == NULL)
            next = head_end;
        status = header_line(line, next, items, first, vias, &content_length);
        if (status != 0)
            goto done;
        p = next;
    }
    {
        const char *body_start = head_end + 4;
        Py_ssize_t available = end - body_start;
        if (content_length >= 0) {
            if (available < content_length) {
                status = -1;
                goto done;
            }
            available = content_length;
        }
        body = PyBytes_FromStringAndSize(body_start, available);
        if (body == NULL) {
            status = -2;
            goto done;
        }
    }
    if (method == NULL) {
        method = Py_NewRef(Py_None);
        uri = ascii_str("", 0);
    }
    if (reason == NULL)
        reason = ascii_str("", 0);
    if (uri == NULL || reason == NULL) {
        status = -2;
        goto done;
    }
    result = Py_BuildValue("(OOlOOOOO)", method, uri, code, reason, items, first, vias, body);
    if (result == NULL)
        status = -2;
done:
    Py_XDECREF(method);
    Py_XDECREF(uri);
    Py_XDECREF(reason);
    Py_XDECREF(items);
    Py_XDECREF(first);
    Py_XDECREF(vias);
    Py_XDECREF(body);
    if (status == -2)
        return NULL;
    if (status != 0)
        Py_RETURN_NONE;
    return result;
}

/* The text of a str argument when it is printable ASCII (no tabs), else NULL. */
static const char *plain_ascii(PyObject *text, Py_ssize_t *length) {
    const char *data;
    Py_ssize_t i;
    if (!PyUnicode_Check(text) || !PyUnicode_IS_ASCII(text))
        return NULL;
    data = (const char *)PyUnicode_DATA(text);
    *length = PyUnicode_GET_LENGTH(text);
    for (i = 0; i < *length; i++)
        if ((unsigned char)data[i] < 0x20 || (unsigned char)data[i] == 0x7f)
            return NULL;
    return data;
}

static PyObject *lower_str(const char *start, const char *end) {
    PyObject *out = PyUnicode_New(end - start, 127);
    char *dst;
    if (out == NULL)
        return NULL;
    dst = (char *)PyUnicode_DATA(out);
    for (; start < end; start++, dst++)
        *dst = (char)(*start >= 'A' && *start <= 'Z' ? *start + 32 : *start);
    return out;
}

PyDoc_STRVAR(parse_via_doc,
"parse_via(text, cls) -> cls(transport, host, port, params) or None\n\n"
"sip.Via.parse for a plain Via value; None means: parse it with the Python code.");

static PyObject *parse_via(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    const char *s, *end, *space, *slash1, *slash2, *sent_start, *sent_end, *colon, *p;
    const char *host_start, *host_end;
    Py_ssize_t length;
    long port = -1;
    PyObject *transport = NULL, *host = NULL, *params = NULL, *fields = NULL, *result = NULL;
    PyObject *port_object, *new_args;

    if (nargs != 2 || !PyType_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "parse_via() takes a str and a tuple class");
        return NULL;
    }
    s = plain_ascii(args[0], &length);
    if (s == NULL)
        Py_RETURN_NONE;
    end = s + length;
    strip(&s, &end);
    space = memchr(s, ' ', (size_t)(end - s));
    if (space == NULL)
        Py_RETURN_NONE;
    slash1 = memchr(s, '/', (size_t)(space - s));
    slash2 = slash1 ? memchr(slash1 + 1, '/', (size_t)(space - slash1 - 1)) : NULL;
    if (slash2 == NULL || memchr(slash2 + 1, '/', (size_t)(space - slash2 - 1)) != NULL)
        Py_RETURN_NONE;
    if (slash1 - s != 3 || (s[0] | 32) != 's' || (s[1] | 32) != 'i' || (s[2] | 32) != 'p')
        Py_RETURN_NONE;
    if (space == slash2 + 1)
        Py_RETURN_NONE;
    sent_start = space + 1;
    p = end;
    strip(&sent_start, &p);
    sent_end = memchr(sent_start, ';', (size_t)(p - sent_start));
    if (sent_end == NULL)
        sent_end = p;
    {
        const char *a = sent_start, *b = sent_end;
        strip(&a, &b);
        if (a >= b)
            Py_RETURN_NONE; /* no host */
        if (*a == '[')
            Py_RETURN_NONE; /* IPv6 reference */
        colon = memchr(a, ':', (size_t)(b - a));
        host_start = a;
        host_end = colon ? colon : b;
        if (host_start == host_end)
            Py_RETURN_NONE;
        if (colon != NULL && colon + 1 < b) {
            port = small_number(colon + 1, b);
            if (port <= 0 || port >= 65536)
                Py_RETURN_NONE;
        }
    }
    transport = lower_str(slash2 + 1, space);
    host = lower_str(host_start, host_end);
    params = PyList_New(0);
    if (transport == NULL || host == NULL || params == NULL)
        goto fail;
    p = sent_end;
    while (p < end) {
        const char *chunk = p + 1, *chunk_end, *eq;
        PyObject *name, *value, *pair;
        chunk_end = memchr(chunk, ';', (size_t)(end - chunk));
        if (chunk_end == NULL)
            chunk_end = end;
        p = chunk_end;
        strip(&chunk, &chunk_end);
        if (chunk == chunk_end)
            continue;
        eq = memchr(chunk, '=', (size_t)(chunk_end - chunk));
        {
            const char *n = chunk, *ne = eq ? eq : chunk_end;
            strip(&n, &ne);
            name = lower_str(n, ne);
        }
        if (eq != NULL) {
            const char *v = eq + 1, *ve = chunk_end;
            strip(&v, &ve);
            value = ascii_str(v, ve - v);
        } else {
            value = Py_NewRef(Py_None);
        }
        pair = name && value ? PyTuple_Pack(2, name, value) : NULL;
        Py_XDECREF(name);
        Py_XDECREF(value);
        if (pair == NULL || PyList_Append(params, pair) < 0) {
            Py_XDECREF(pair);
            goto fail;
        }
        Py_DECREF(pair);
    }
    {
        PyObject *param_tuple = PyList_AsTuple(params);
        if (param_tuple == NULL)
            goto fail;
        port_object = port >= 0 ? PyLong_FromLong(port) : Py_NewRef(Py_None);
        if (port_object == NULL) {
            Py_DECREF(param_tuple);
            goto fail;
        }
        fields = PyTuple_Pack(4, transport, host, port_object, param_tuple);
        Py_DECREF(port_object);
        Py_DECREF(param_tuple);
    }
    if (fields == NULL)
        goto fail;
    /* tuple.__new__(cls, fields): the NamedTuple without its Python __new__. */
    new_args = PyTuple_Pack(1, fields);
    if (new_args != NULL) {
        result = PyTuple_Type.tp_new((PyTypeObject *)args[1], new_args, NULL);
        Py_DECREF(new_args);
    }
fail:
    Py_XDECREF(transport);
    Py_XDECREF(host);
    Py_XDECREF(params);
    Py_XDECREF(fields);
    return result;
}

PyDoc_STRVAR(parse_cseq_doc,
"parse_cseq(value) -> (number, method) or None\n\n"
"sip.parse_cseq for a plain CSeq value; None means: parse it with the Python code.");

static PyObject *parse_cseq(PyObject *module, PyObject *arg) {
    (void)module;
    const char *s, *end, *space, *m;
    Py_ssize_t length;
    long number;
    PyObject *method, *result;
    s = plain_ascii(arg, &length);
    if (s == NULL)
        Py_RETURN_NONE;
    end = s + length;
    strip(&s, &end);
    space = memchr(s, ' ', (size_t)(end - s));
    if (space == NULL)
        Py_RETURN_NONE;
    number = small_number(s, space);
    if (number < 0)
        Py_RETURN_NONE;
    m = space + 1;
    strip(&m, &end);
    if (m == end)
        Py_RETURN_NONE;
    for (const char *c = m; c < end; c++)
        if (!is_token_char((unsigned char)*c))
            Py_RETURN_NONE;
    method = ascii_str(m, end - m);
    if (method == NULL)
        return NULL;
    result = Py_BuildValue("(lN)", number, method);
    return result;
}

#ifdef HAVE_SENDMMSG
/* Datagrams per sendmmsg(2) call: the arrays live on the stack (about 13 KB). */
#define SEND_BATCH 64

/* item = (data, (host, port)) with data bytes, host an address literal of the
 * socket's family, 0 < port < 65536: its buffer and address filled in, the bytes
 * object returned (borrowed). NULL for anything else, with no Python error set:
 * the caller stops there and the transport sends (or refuses) that one. */
static PyObject *datagram_of(PyObject *item, int family, struct sockaddr_storage *address,
                             socklen_t *address_length) {
    PyObject *data, *target, *host, *port_object;
    const char *host_text;
    long port;
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2)
        return NULL;
    data = PyTuple_GET_ITEM(item, 0);
    target = PyTuple_GET_ITEM(item, 1);
    if (!PyBytes_Check(data) || PyBytes_GET_SIZE(data) == 0)
        return NULL; /* an empty datagram: the transport's rule (it sends nothing) */
    if (!PyTuple_Check(target) || PyTuple_GET_SIZE(target) != 2)
        return NULL;
    host = PyTuple_GET_ITEM(target, 0);
    port_object = PyTuple_GET_ITEM(target, 1);
    if (!PyUnicode_Check(host) || !PyUnicode_IS_ASCII(host) || !PyLong_Check(port_object))
        return NULL;
    port = PyLong_AsLong(port_object);
    if (port <= 0 || port > 65535) {
        PyErr_Clear(); /* an overflow is just a bad port */
        return NULL;
    }
    host_text = (const char *)PyUnicode_DATA(host);
    if ((Py_ssize_t)strlen(host_text) != PyUnicode_GET_LENGTH(host))
        return NULL; /* an embedded NUL */
    memset(address, 0, sizeof(*address));
    if (family == AF_INET) {
        struct sockaddr_in *in4 = (struct sockaddr_in *)address;
        if (inet_pton(AF_INET, host_text, &in4->sin_addr) != 1)
            return NULL;
        in4->sin_family = AF_INET;
        in4->sin_port = htons((unsigned short)port);
        *address_length = sizeof(*in4);
    } else if (family == AF_INET6) {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)address;
        if (inet_pton(AF_INET6, host_text, &in6->sin6_addr) != 1)
            return NULL;
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((unsigned short)port);
        *address_length = sizeof(*in6);
    } else {
        return NULL;
    }
    return data;
}
#endif

PyDoc_STRVAR(sendmmsg_doc,
"sendmmsg(fd, family, datagrams, start) -> int\n\n"
"Send datagrams[start:], each a (data, (host, port)) with host an address of the\n"
"socket's family (AF_INET or AF_INET6), over the datagram socket fd, in order, a\n"
"batch per system call; return how many were sent from start. It stops at the first\n"
"one not sent (a full send buffer, an unreachable network, an address it does not\n"
"read, any error): the caller sends that one through its transport, which buffers\n"
"it or reports why. Errors are never raised for what the network did.");

/* Why: a KDMQ request costs one datagram out, and sendto(2) per datagram was the
 * largest system-call cost of the driver. sendmmsg(2) hands the kernel up to
 * SEND_BATCH of them at once. The socket is the event loop's own, non-blocking;
 * the loop is not told, so the caller uses this only while the transport holds
 * nothing queued (otherwise these would overtake its queue). */
static PyObject *py_sendmmsg(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    long fd, family;
    Py_ssize_t start, count, total = 0;
    PyObject *datagrams;
    if (nargs != 4 || !PyLong_Check(args[0]) || !PyLong_Check(args[1]) || !PyList_Check(args[2])
        || !PyLong_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "sendmmsg() takes an fd, a family, a list and a start");
        return NULL;
    }
    fd = PyLong_AsLong(args[0]);
    family = PyLong_AsLong(args[1]);
    start = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred())
        return NULL;
    datagrams = args[2];
    count = PyList_GET_SIZE(datagrams);
    if (fd < 0 || fd > INT_MAX || start < 0 || start > count) {
        PyErr_SetString(PyExc_ValueError, "sendmmsg(): fd or start out of range");
        return NULL;
    }
#ifdef HAVE_SENDMMSG
    {
        struct mmsghdr headers[SEND_BATCH];
        struct iovec buffers[SEND_BATCH];
        struct sockaddr_storage addresses[SEND_BATCH];
        PyObject *held[SEND_BATCH];
        Py_ssize_t next = start;
        /* The size is read again for every batch: while the GIL was released the
         * list may have changed. */
        while (next < PyList_GET_SIZE(datagrams)) {
            int filled = 0, sent, i;
            int stopped = 0; /* an item the batch cannot take ends it */
            while (filled < SEND_BATCH && next + filled < PyList_GET_SIZE(datagrams)) {
                socklen_t length = 0;
                PyObject *data = datagram_of(PyList_GET_ITEM(datagrams, next + filled),
                                             (int)family, &addresses[filled], &length);
                if (data == NULL) {
                    stopped = 1;
                    break;
                }
                /* Held while the GIL is released: the list may change meanwhile. */
                Py_INCREF(data);
                held[filled] = data;
                buffers[filled].iov_base = PyBytes_AS_STRING(data);
                buffers[filled].iov_len = (size_t)PyBytes_GET_SIZE(data);
                memset(&headers[filled], 0, sizeof(headers[filled]));
                headers[filled].msg_hdr.msg_name = &addresses[filled];
                headers[filled].msg_hdr.msg_namelen = length;
                headers[filled].msg_hdr.msg_iov = &buffers[filled];
                headers[filled].msg_hdr.msg_iovlen = 1;
                filled++;
            }
            if (filled == 0)
                break;
            Py_BEGIN_ALLOW_THREADS
            do {
                sent = sendmmsg((int)fd, headers, (unsigned int)filled, MSG_DONTWAIT);
            } while (sent < 0 && errno == EINTR);
            Py_END_ALLOW_THREADS
            for (i = 0; i < filled; i++)
                Py_DECREF(held[i]);
            if (sent <= 0)
                break;
            total += sent;
            next += sent;
            if (sent < filled || stopped)
                break;
        }
    }
#endif
    return PyLong_FromSsize_t(total);
}

/* ------------------------------------------------------------------ htable's SET
 *
 * scan_set() reads the body every Kamailio node writes for an htable SET (compact
 * JSON in the module's field order, names and values without escapes), which is the
 * usual KDMQ message of peer htable. It is htable_codec._scan_set and _usual_set in
 * one pass: the same literals in the same order, the same checks, the same objects
 * (tests/kamailio/test_htable_codec.py compares them on every cut and byte swap of
 * real bodies). Its cost was a quarter of what the htable mirror spends per message,
 * most of it in the compiled scan's per-byte calls.
 */

/* Whether s[at..] starts with the literal text. */
static int has_literal(const char *s, Py_ssize_t size, Py_ssize_t at, const char *text,
                       Py_ssize_t length) {
    return at + length <= size && memcmp(s + at, text, (size_t)length) == 0;
}
#define HAS(s, size, at, lit) has_literal(s, size, at, lit, (Py_ssize_t)(sizeof(lit) - 1))

/* Where the JSON string whose text starts at `at` closes (its quote), when that text
 * has no escape and no control character; -1 otherwise. */
static Py_ssize_t text_end(const char *s, Py_ssize_t size, Py_ssize_t at) {
    for (Py_ssize_t i = at; i < size; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"')
            return i;
        if (c == '\\' || c < 0x20)
            return -1;
    }
    return -1;
}

/* The JSON integer at `at` (no fraction or exponent, at most ten digits) in *value;
 * returns where it ends, -1 when there is none. What follows is the caller's to
 * check (a digit there means a longer number). */
static Py_ssize_t json_number(const char *s, Py_ssize_t size, Py_ssize_t at,
                              long long *value) {
    int negative = at < size && s[at] == '-';
    Py_ssize_t start, end;
    long long n = 0;
    if (negative)
        at++;
    if (at >= size || s[at] < '0' || s[at] > '9')
        return -1;
    if (s[at] == '0') {
        *value = 0;
        return at + 1; /* JSON has no leading zero: a digit after it ends the match */
    }
    start = end = at;
    while (end < size && end - start < 10 && s[end] >= '0' && s[end] <= '9') {
        n = n * 10 + (s[end] - '0');
        end++;
    }
    *value = negative ? -n : n;
    return end;
}

#define INT32_LOW (-2147483647LL - 1)
#define INT32_HIGH 2147483647LL

/* UTF-8 text (lone surrogates allowed, as Python's "surrogatepass"); NULL with no
 * error set when it is not UTF-8, NULL with an error set on memory exhaustion. */
static PyObject *utf8_text(const char *s, Py_ssize_t length) {
    PyObject *text = PyUnicode_DecodeUTF8(s, length, "surrogatepass");
    if (text == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
        PyErr_Clear();
    return text;
}

PyDoc_STRVAR(scan_set_doc,
"scan_set(body) -> (htname, cname, value, mode) or None\n\n"
"htable_codec.read_set for the usual SET body; None for any other body.");

static PyObject *scan_set(PyObject *module, PyObject *arg) {
    (void)module;
    static const char open[] = "{\"action\":2,\"htname\":\"";
    const char *s;
    Py_ssize_t size, htname_at, htname_end, cname_at, cname_end, at;
    Py_ssize_t text_at = -1, text_stop = -1;
    long long type, number = 0, mode;
    int has_number = 0;
    PyObject *htname, *cname, *value, *result;
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "scan_set() takes bytes");
        return NULL;
    }
    s = PyBytes_AS_STRING(arg);
    size = PyBytes_GET_SIZE(arg);
    if (!HAS(s, size, 0, open))
        Py_RETURN_NONE;
    htname_at = (Py_ssize_t)(sizeof(open) - 1);
    htname_end = text_end(s, size, htname_at);
    if (htname_end < 0 || !HAS(s, size, htname_end, "\",\"cname\":\""))
        Py_RETURN_NONE;
    cname_at = htname_end + 11;
    cname_end = text_end(s, size, cname_at);
    if (cname_end < 0 || !HAS(s, size, cname_end, "\",\"type\":"))
        Py_RETURN_NONE;
    at = json_number(s, size, cname_end + 9, &type);
    if (at < 0)
        Py_RETURN_NONE;
    if (HAS(s, size, at, ",\"strval\":\"")) {
        text_at = at + 11;
        text_stop = text_end(s, size, text_at);
        if (text_stop < 0 || !HAS(s, size, text_stop, "\",\"mode\":"))
            Py_RETURN_NONE;
        at = text_stop + 9;
    } else if (HAS(s, size, at, ",\"intval\":")) {
        at = json_number(s, size, at + 10, &number);
        if (at < 0 || !HAS(s, size, at, ",\"mode\":"))
            Py_RETURN_NONE;
        has_number = 1;
        at += 8;
    } else {
        Py_RETURN_NONE;
    }
    at = json_number(s, size, at, &mode);
    if (at < 0 || at >= size || s[at] != '}')
        Py_RETURN_NONE;
    for (Py_ssize_t i = at + 1; i < size; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\n' && s[i] != '\r')
            Py_RETURN_NONE; /* anything but JSON's whitespace after the object */
    if (type < INT32_LOW || type > INT32_HIGH || mode < INT32_LOW || mode > INT32_HIGH)
        Py_RETURN_NONE;
    if (type & 2) { /* AVP_VAL_STR */
        if (text_at < 0)
            Py_RETURN_NONE; /* a string type with an integer: the value is missing */
        value = utf8_text(s + text_at, text_stop - text_at);
    } else {
        if (!has_number || number < INT32_LOW || number > INT32_HIGH)
            Py_RETURN_NONE;
        value = PyLong_FromLongLong(number);
    }
    if (value == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    htname = utf8_text(s + htname_at, htname_end - htname_at);
    cname = htname == NULL ? NULL : utf8_text(s + cname_at, cname_end - cname_at);
    if (cname == NULL) {
        Py_DECREF(value);
        Py_XDECREF(htname);
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    result = PyTuple_New(4);
    if (result == NULL) {
        Py_DECREF(htname);
        Py_DECREF(cname);
        Py_DECREF(value);
        return NULL;
    }
    PyTuple_SET_ITEM(result, 0, htname);
    PyTuple_SET_ITEM(result, 1, cname);
    PyTuple_SET_ITEM(result, 2, value);
    {
        PyObject *m = PyLong_FromLongLong(mode);
        if (m == NULL) {
            Py_DECREF(result);
            return NULL;
        }
        PyTuple_SET_ITEM(result, 3, m);
    }
    return result;
}

static PyMethodDef methods[] = {
    {"scan", (PyCFunction)scan, METH_O, scan_doc},
    {"parse_via", (PyCFunction)(void (*)(void))parse_via, METH_FASTCALL, parse_via_doc},
    {"parse_cseq", (PyCFunction)parse_cseq, METH_O, parse_cseq_doc},
    {"sendmmsg", (PyCFunction)(void (*)(void))py_sendmmsg, METH_FASTCALL, sendmmsg_doc},
    {"scan_set", (PyCFunction)scan_set, METH_O, scan_set_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "app.dmq._sipscan",
    "Native fast paths of the SIP codec; see app/dmq/_sipscan.c.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__sipscan(void) {
    size_t i;
    PyObject *module;
    for (i = 0; i < N_KNOWN; i++) {
        known_objects[i] = PyUnicode_InternFromString(KNOWN_NAMES[i]);
        if (known_objects[i] == NULL)
            return NULL;
    }
    str_via = known_objects[0];
    module = PyModule_Create(&module_def);
    if (module != NULL && PyModule_AddObjectRef(module, "AVAILABLE", Py_True) < 0)
        Py_CLEAR(module);
    return module;
}
