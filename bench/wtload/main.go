// wtload: a compiled WebTransport load generator for bench/router_ingest.py.
//
// Each session is its own QUIC connection (as Chromium makes them), speaking just enough
// HTTP/3 for a WebTransport session of draft-02, the dialect aioquic's server and Chromium
// share: SETTINGS with H3_DATAGRAM and ENABLE_WEBTRANSPORT, an extended CONNECT on the first
// bidirectional stream, a control stream carrying the hello (and pongs to the router's pings),
// then 36-byte report datagrams, one per QUIC packet. quic-go from the Go module proxy does the QUIC; no WebTransport library
// is used, because webtransport-go's releases speak a later draft that aioquic does not.
//
// Why it exists: Python clients cost about as much per report as the router does, so on two
// cores they could not load the router to its ceiling (bench/results/router.md).
//
// Protocol with the parent: one line "ready" on stdout once every session said hello, then
// it waits for a line on stdin, sends for -seconds, says "stopped", and prints one JSON line of
// counts once its sessions are closed.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"sync"
	"time"

	"github.com/quic-go/qpack"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/quicvarint"
)

const (
	settingH3Datagram         = 0x33
	settingEnableWebTransport = 0x2b603742
	frameHeaders              = 0x01
	frameSettings             = 0x04
	wtBidiSignal              = 0x41
)

type result struct {
	ID     string `json:"id"`
	Sent   int    `json:"sent"`
	Errors int    `json:"errors"`
	Error  string `json:"error,omitempty"`
}

type session struct {
	id   string
	conn *quic.Conn
	ctrl *quic.Stream
	res  result
}

func frame(typ uint64, payload []byte) []byte {
	b := quicvarint.Append(nil, typ)
	b = quicvarint.Append(b, uint64(len(payload)))
	return append(b, payload...)
}

func open(ctx context.Context, addr, path, id string) (*session, error) {
	tlsConf := &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h3"}} // bench only
	conn, err := quic.DialAddr(ctx, addr, tlsConf, &quic.Config{
		EnableDatagrams: true, MaxIdleTimeout: 30 * time.Second, KeepAlivePeriod: 5 * time.Second,
	})
	if err != nil {
		return nil, fmt.Errorf("dial: %w", err)
	}
	// HTTP/3 control stream with our SETTINGS.
	uni, err := conn.OpenUniStreamSync(ctx)
	if err != nil {
		return nil, err
	}
	var settings []byte
	for _, kv := range [][2]uint64{{settingH3Datagram, 1}, {settingEnableWebTransport, 1}} {
		settings = quicvarint.Append(settings, kv[0])
		settings = quicvarint.Append(settings, kv[1])
	}
	if _, err := uni.Write(append(quicvarint.Append(nil, 0x00), frame(frameSettings, settings)...)); err != nil {
		return nil, err
	}
	// The server's own unidirectional streams (control, QPACK): read and ignored.
	go func() {
		for {
			s, err := conn.AcceptUniStream(context.Background())
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(io.Discard, s) }()
		}
	}()
	// Extended CONNECT.
	req, err := conn.OpenStreamSync(ctx)
	if err != nil {
		return nil, err
	}
	var hdr bytes.Buffer
	enc := qpack.NewEncoder(&hdr)
	for _, f := range [][2]string{
		{":method", "CONNECT"}, {":protocol", "webtransport"}, {":scheme", "https"},
		{":authority", addr}, {":path", path},
	} {
		if err := enc.WriteField(qpack.HeaderField{Name: f[0], Value: f[1]}); err != nil {
			return nil, err
		}
	}
	if _, err := req.Write(frame(frameHeaders, hdr.Bytes())); err != nil {
		return nil, err
	}
	status, err := readStatus(req)
	if err != nil {
		return nil, fmt.Errorf("CONNECT: %w", err)
	}
	if status != "200" {
		return nil, fmt.Errorf("CONNECT answered %s", status)
	}
	go func() { _, _ = io.Copy(io.Discard, req) }() // capsules, if any
	// The session's control stream: signal, session id (the CONNECT stream's id), then hello.
	ctrl, err := conn.OpenStreamSync(ctx)
	if err != nil {
		return nil, err
	}
	body, _ := json.Marshal(map[string]any{"type": "hello", "session_id": id, "client": "wtload"})
	msg := quicvarint.Append(nil, wtBidiSignal)
	msg = quicvarint.Append(msg, uint64(req.StreamID()))
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(body)))
	if _, err := ctrl.Write(append(msg, body...)); err != nil {
		return nil, err
	}
	go answerPings(ctrl) // as a page does: the router pings 20 times a second until answered
	return &session{id: id, conn: conn, ctrl: ctrl, res: result{ID: id}}, nil
}

// answerPings reads the router's control frames (4-byte length, JSON) and answers each ping
// with a pong, as the page and the Python client do; everything else is ignored.
func answerPings(ctrl *quic.Stream) {
	var head [4]byte
	for {
		if _, err := io.ReadFull(ctrl, head[:]); err != nil {
			return
		}
		body := make([]byte, binary.BigEndian.Uint32(head[:]))
		if _, err := io.ReadFull(ctrl, body); err != nil {
			return
		}
		var msg struct {
			Type string `json:"type"`
			ID   int64  `json:"id"`
		}
		if json.Unmarshal(body, &msg) != nil || msg.Type != "ping" {
			continue
		}
		now := float64(time.Now().UnixNano()) / 1e6
		pong, _ := json.Marshal(map[string]any{"type": "pong", "id": msg.ID, "t_client_ms": now})
		if _, err := ctrl.Write(append(binary.BigEndian.AppendUint32(nil, uint32(len(pong))), pong...)); err != nil {
			return
		}
	}
}

// readStatus reads HTTP/3 frames up to the first HEADERS and returns its :status.
func readStatus(s *quic.Stream) (string, error) {
	r := quicvarint.NewReader(s)
	for {
		typ, err := quicvarint.Read(r)
		if err != nil {
			return "", err
		}
		n, err := quicvarint.Read(r)
		if err != nil {
			return "", err
		}
		payload := make([]byte, n)
		if _, err := io.ReadFull(r, payload); err != nil {
			return "", err
		}
		if typ != frameHeaders {
			continue
		}
		next := qpack.NewDecoder().Decode(payload)
		for {
			f, err := next()
			if errors.Is(err, io.EOF) {
				return "", errors.New("no :status")
			}
			if err != nil {
				return "", err
			}
			if f.Name == ":status" {
				return f.Value, nil
			}
		}
	}
}

// run sends reports for the given time: flat out (quic-go blocks while its datagram queue is
// full) or paced at rate per second. rtp_ts = seq = the report's index in the session.
func (s *session) run(seconds, rate float64, quarter uint64) {
	buf := quicvarint.Append(nil, quarter)
	head := len(buf)
	buf = append(buf, make([]byte, 36)...)
	rep := buf[head:]
	rep[0], rep[1] = 1, 1
	binary.BigEndian.PutUint16(rep[2:], 1) // detected
	binary.BigEndian.PutUint32(rep[12:], math.Float32bits(320.5))
	binary.BigEndian.PutUint32(rep[16:], math.Float32bits(240.5))
	t0 := time.Now()
	end := t0.Add(time.Duration(seconds * float64(time.Second)))
	for seq := 0; ; {
		now := time.Now()
		if !now.Before(end) {
			break
		}
		if rate > 0 && float64(seq) >= now.Sub(t0).Seconds()*rate {
			time.Sleep(time.Millisecond)
			continue
		}
		ms := float64(now.UnixNano()) / 1e6
		binary.BigEndian.PutUint32(rep[4:], uint32(seq))
		binary.BigEndian.PutUint32(rep[8:], uint32(seq))
		binary.BigEndian.PutUint64(rep[20:], math.Float64bits(ms))
		binary.BigEndian.PutUint64(rep[28:], math.Float64bits(ms))
		if err := s.conn.SendDatagram(buf); err != nil {
			s.res.Errors++
			s.res.Error = err.Error()
			if s.conn.Context().Err() != nil {
				return
			}
			continue
		}
		seq++
		s.res.Sent = seq
	}
}

func main() {
	addr := flag.String("addr", "127.0.0.1:4433", "router's WebTransport host:port")
	path := flag.String("path", "/wt", "WebTransport path")
	n := flag.Int("sessions", 4, "sessions (QUIC connections)")
	seconds := flag.Float64("seconds", 10, "seconds of load")
	rate := flag.Float64("rate", 0, "reports/s per session; 0 = as fast as QUIC takes them")
	prefix := flag.String("prefix", "wtload", "session id prefix")
	flag.Parse()

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	sessions := make([]*session, *n)
	var wg sync.WaitGroup
	var firstErr error
	var mu sync.Mutex
	for i := range sessions {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			s, err := open(ctx, *addr, *path, fmt.Sprintf("%s-%d", *prefix, i))
			mu.Lock()
			defer mu.Unlock()
			if err != nil && firstErr == nil {
				firstErr = err
			}
			sessions[i] = s
		}(i)
	}
	wg.Wait()
	cancel()
	if firstErr != nil {
		fmt.Fprintln(os.Stderr, "wtload:", firstErr)
		os.Exit(1)
	}
	time.Sleep(300 * time.Millisecond) // let the hellos be read before any report
	fmt.Println("ready")
	_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
	t0 := time.Now()
	for _, s := range sessions {
		wg.Add(1)
		go func(s *session) {
			defer wg.Done()
			s.run(*seconds, *rate, 0) // the CONNECT stream is stream 0: quarter id 0
		}(s)
	}
	wg.Wait()
	elapsed := time.Since(t0).Seconds()
	fmt.Println("stopped")
	time.Sleep(500 * time.Millisecond) // the last datagrams leave before the close
	out := struct {
		Seconds  float64  `json:"seconds"`
		Sessions []result `json:"sessions"`
	}{Seconds: elapsed}
	for _, s := range sessions {
		_ = s.ctrl.Close()
		_ = s.conn.CloseWithError(0, "done")
		out.Sessions = append(out.Sessions, s.res)
	}
	time.Sleep(100 * time.Millisecond)
	b, _ := json.Marshal(out)
	fmt.Println(string(b))
}
