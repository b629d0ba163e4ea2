/* cuju-libvirt data plane: version constants shared by every C file.
 *
 * CUJU_WIRE_VERSION is the version of the FT-link wire format (see wire.h). A
 * peer speaking another version is refused at connection setup. Version 2
 * added the disk section of an epoch and the HELLO's disk geometry.
 */
#ifndef CUJU_VERSION_H
#define CUJU_VERSION_H

#define CUJU_EXT_VERSION "0.1.0"
#define CUJU_WIRE_VERSION 2

#endif
