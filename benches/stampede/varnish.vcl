# Varnish config of the stampede bench: nothing but the backend, so the built-in VCL decides
# (GET/HEAD cached, TTL from Cache-Control: max-age=60, a 500 becomes hit-for-miss) and requests
# for an object being fetched wait on it: Varnish's default request coalescing.
vcl 4.1;

backend upstream {
    .host = "@UPSTREAM_HOST@";
    .port = "@UPSTREAM_PORT@";
    .first_byte_timeout = 30s;
    .between_bytes_timeout = 30s;
}
