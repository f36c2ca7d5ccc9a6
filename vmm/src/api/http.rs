//! HTTP/1.1 server on the API UNIX socket.
