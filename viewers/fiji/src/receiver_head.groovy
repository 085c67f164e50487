#@ String (label="Endpoint", value="tcp://127.0.0.1:55556", description="tcp://HOST:PORT to listen on (loopback only unless remote senders are allowed); port 0 picks a free port") endpoint
#@ String (label="Frames without axes or mode hint", choices={"replace", "stack"}, value="replace", description="replace: each frame replaces its window's image; stack: each frame is appended as the next time point") mode
#@ String (label="Multichannel display", choices={"composite", "color", "grayscale"}, value="composite") channel_display
#@ File (label="Output directory (optional)", style="directory", required=false, description="If set, every 'report' request also saves each image as <title>.tif and writes report.json here") output_dir
#@ Boolean (label="Add ROIs to the ROI Manager (needs a display)", value=true) roi_manager
#@ Boolean (label="Allow remote senders (listen beyond 127.0.0.1)", value=false) allow_remote
#@ Boolean (label="Allow unauthenticated senders (JeroMQ 0.3 only: any local account could send)", value=false) allow_unauthenticated
#@ Boolean (label="Stop when standard input closes (headless use)", value=false) stop_on_stdin_eof
#@ Integer (label="Most senders at once", value=1024, description="At this many, a new sender takes the place of the one heard from least recently (one that died without saying bye)") max_senders

/*
 * polystore receiver for Fiji / ImageJ: frames saved with backend="fiji_stream" become images.
 *
 * Speaks wire protocol v1 (docs/protocol.md, mirrored in polystore/streaming/protocol.py and
 * polystore/streaming/receiver.py): a JeroMQ ROUTER socket on tcp://127.0.0.1, a hello/welcome
 * handshake with a shared-memory probe, every header validated in the order protocol.md gives
 * ("Validation"), pixels copied straight out of /dev/shm/<segment> through a read-only memory
 * map (or out of the message for inline frames), and the `ack` (the sender's credit) sent once
 * the copy is done (acks of frames already waiting behind it go together), before anything
 * is drawn. A bad message gets an `error` reply;
 * nothing a message contains stops this script. Installation and use: docs/fiji.md.
 *
 * Type mapping (dtype on the wire -> ImageJ image type):
 *   uint8   -> 8-bit  (exact)         uint16 -> 16-bit (exact)         float32 -> 32-bit (exact)
 *   int8, int16, float16                        -> 32-bit float, exact
 *   uint32, int32                               -> 32-bit float, exact up to |v| = 2^24, then
 *                                                  rounded to the nearest float32
 *   uint64, int64, float64                      -> 32-bit float, rounded to the nearest float32
 *                                                  (float64 beyond +-3.4e38 becomes +-Infinity)
 *   display.kind == "labels": 16-bit when every value is an integer in 0..65535 (uint8/uint16
 *   always), else 32-bit float; shown with a glasbey LUT (Fiji's glasbey_on_dark.lut when
 *   present, else an equivalent built here), display range 0..max(255, largest label).
 *   A stream keeps one type: a frame of another dtype starts its image again (docs/protocol.md,
 *   "Modes"); labels that outgrow 16 bits within one dtype turn it into 32-bit float.
 *
 * Windows and axes: one ImagePlus per stream key, titled with the key. The last two dims of
 * `shape` are (rows, columns) = (height, width). `axes` keys c, z and t (and their synonyms in
 * any case: channel(s), slice(s), time, frame(s)..., docs/protocol.md) place the frame in a hyperstack (setDimensions(c, z, t)) that grows as needed,
 * reusing its pixel arrays (the ImagePlus is never re-created per frame; it becomes a
 * CompositeImage once, when a second channel appears). Any other axis name is folded into the
 * window title ("stream [p=3]"), since ImageJ has no more dimensions. A frame's own leading
 * dims are named by the entries of `axis_names` that are not keys of `axes`, else by default
 * (1 dim: z; 2: c, z; 3: t, c, z); more than ImageJ's c/z/t can hold is answered `bad_shape`.
 * A frame's display.mode wins; without one, frames with axes (any names) are placed and the others
 * follow the `mode` parameter: `replace` (the window shows just this frame) or `stack`
 * (appended as the next time point); `place` without axes replaces. A stream whose frames
 * change mode, kind, dtype or shape starts again (docs/protocol.md, as napari). Empty frames (a 0 in shape) are acknowledged and counted, not shown. A frame
 * whose placement would not fit into the Java heap (say `t: 999999`) is answered `too_large`
 * before anything changes. If the user closes a window or changes an image in Fiji, the next
 * frame opens a new window or goes on from the changed image.
 *
 * Display hints: colormap (gray, red, green, blue, cyan, magenta, yellow, fire, ice, spectrum,
 * glasbey, or any LUT file Fiji has, e.g. viridis via mpl-viridis.lut) applies to the
 * channel(s) the frame covers; contrast_limits sets their display range; opacity is ignored.
 *
 * ROIs (`rois` messages): polygon, rectangle, ellipse, line and point become ImageJ ROIs at
 * x = column, y = row, positioned (c, z, t) by the message's axes (unset axes = all), named by
 * their label (else "<path>#<n>"). They go to the image's Overlay (saved with its TIFF) and, when
 * Fiji has a display, also to the ROI Manager. ROIs sent again for the same path and position
 * replace the earlier ones; ROIs for a stream that has no image yet wait for its first frame.
 *
 * Control: `report` answers a `report` message (counters plus one entry per image) and, with an
 * output directory, saves every image as TIFF and writes report.json there first; `clear`
 * closes every image and answers `ack`; `bye` forgets the sender and unmaps its segments.
 * Headless it stops on SIGTERM (or when stdin closes, if asked); in Fiji, with its Stop button.
 */
