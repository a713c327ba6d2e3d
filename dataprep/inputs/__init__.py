"""What a build reads: `sources` (kinds of source, their listings, tar contents), `safe_fetch`
(the guarded fetch: http(s) and object-store reads with size, scheme and address limits, local
paths kept inside their roots), `image_formats` (sniffed, allowed formats), `photos` (decoding,
filters, the `Rejected` verdict every stage reports with)."""
